// The part of node-gyp-build (which ships no types) that lib/kvm/native.ts uses.
declare module 'node-gyp-build' {
  /** Loads the addon of the package in `dir`. */
  function load(dir: string): unknown;
  namespace load {
    /** The addon file of the package in `dir` that fits this process; throws if none does. */
    function resolve(dir: string): string;
  }
  export default load;
}
