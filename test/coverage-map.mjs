// Coverage is measured for the library (lib/) only.
export default (testFile) => ['lib/**/*.ts'];
