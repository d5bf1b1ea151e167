// `node-kvm run`'s option values and configuration file (lib/cli/run-options.ts): pure parsing
// and checking, no machine.
import { writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { codeCacheUse } from '../../lib/cli/command-names.js';
import {
  formatSize, mergeRunOptions, parseCpuAffinity, parseDirtyLog, parseMemory, parseRunArgs, parseSize, parseVcpus, readRunConfig, runOptionsFromConfig, runOptionsToConfig,
} from '../../lib/cli/run-options.js';
import { throwsArgError } from '../helpers/kvm.js';

const MIB = 1024 * 1024;

t.test('sizes: units up to T, fractions, hex; the limit in the message', async (t) => {
  t.equal(parseSize('64M'), 64 * MIB);
  t.equal(parseSize('64MiB'), 64 * MIB);
  t.equal(parseSize('1.5G'), 1536 * MIB);
  t.equal(parseSize('0x4000000'), 64 * MIB);
  t.equal(parseSize('0x10M'), 16 * MIB);
  t.equal(parseSize('2T'), 2 * 1024 ** 4);
  t.equal(parseSize('.5K'), 512);
  t.equal(parseSize('4096'), 4096, 'no unit: bytes');
  t.equal(parseMemory('3G'), 3 * 1024 * MIB);
  t.equal(parseMemory('1.25G'), 1280 * MIB);
  throwsArgError(t, () => parseMemory('4G'), 'ERR_INVALID_ARG_VALUE', "--memory: '4G' is too large: at most 3 GiB");
  throwsArgError(t, () => parseMemory('1T'), 'ERR_INVALID_ARG_VALUE', "--memory: '1T' is too large: at most 3 GiB");
  throwsArgError(t, () => parseMemory('1.3G'), 'ERR_INVALID_ARG_VALUE', "--memory: '1.3G' is not a whole number of bytes");
  throwsArgError(t, () => parseMemory('1.1M'), 'ERR_INVALID_ARG_VALUE', "--memory: '1.1M' is not a whole number of bytes");
  throwsArgError(t, () => parseMemory('1536K'), 'ERR_INVALID_ARG_VALUE', "--memory: '1536K' is not a positive multiple of 1 MiB");
  throwsArgError(t, () => parseMemory('0M'), 'ERR_INVALID_ARG_VALUE', "--memory: '0M' is not a positive multiple of 1 MiB");
  throwsArgError(t, () => parseMemory('lots'), 'ERR_INVALID_ARG_VALUE', "--memory: 'lots' is not a size like 64M, 1.5G or 0x4000000");
  throwsArgError(t, () => parseMemory('64Q', 'machine.json: field \'memory\''), 'ERR_INVALID_ARG_VALUE', "machine.json: field 'memory': '64Q' is not a size like 64M, 1.5G or 0x4000000");
  t.equal(parseSize('1.5K', 'x: LEN', { max: MIB }), 1536, "x's LEN is a size too");
  throwsArgError(t, () => parseSize('2M', 'x: LEN', { max: MIB }), 'ERR_INVALID_ARG_VALUE', "x: LEN: '2M' is too large: at most 1 MiB");
  t.equal(formatSize(3 * 1024 * MIB), '3 GiB');
  t.equal(formatSize(1536 * MIB), '1.5 GiB');
  t.equal(formatSize(4097), '4097 bytes');
});

t.test('vCPU counts, dirty log modes and CPU affinity', async (t) => {
  t.equal(parseVcpus('255'), 255);
  throwsArgError(t, () => parseVcpus('256'), 'ERR_INVALID_ARG_VALUE', "--vcpus must be an integer from 1 to 255, got '256'");
  throwsArgError(t, () => parseVcpus('0'), 'ERR_INVALID_ARG_VALUE', "--vcpus must be an integer from 1 to 255, got '0'");
  throwsArgError(t, () => parseVcpus('1.5'), 'ERR_INVALID_ARG_VALUE', "--vcpus must be an integer from 1 to 255, got '1.5'");
  t.equal(parseDirtyLog('ring'), 'ring');
  throwsArgError(t, () => parseDirtyLog('log'), 'ERR_INVALID_ARG_VALUE', "--dirty-log must be bitmap or ring, got 'log'");
  const last = cpus().length - 1;
  t.same(parseCpuAffinity(['0'], 2), [[0], [0]], 'a list alone: every vCPU');
  t.same(parseCpuAffinity([`0-${last}`, `1=${last}`], 3), [Array.from({ length: last + 1 }, (_, i) => i), [last], Array.from({ length: last + 1 }, (_, i) => i)]);
  t.same(parseCpuAffinity([`0,0,${last}`], 1), [[...new Set([0, last])]], 'repeats once');
  throwsArgError(t, () => parseCpuAffinity(['2=0'], 2), 'ERR_INVALID_ARG_VALUE', '--cpu-affinity 2=0: the machine has 2 vCPUs (0-1)');
  throwsArgError(t, () => parseCpuAffinity([`${last + 1}`], 1), 'ERR_INVALID_ARG_VALUE', `--cpu-affinity: CPU ${last + 1} is not one of this host's ${last + 1} CPUs (0-${last})`);
  throwsArgError(t, () => parseCpuAffinity(['3-1'], 1), 'ERR_INVALID_ARG_VALUE', "--cpu-affinity: '3-1' is not a CPU list like 2 or 0,2-3");
});

t.test('run arguments: paired flags, values checked by their option names', async (t) => {
  t.same(parseRunArgs(['a.bin', '--no-irqchip', '--memory', '2M']).options, { image: 'a.bin', irqchip: false, memory: '2M' });
  t.same(parseRunArgs(['--restore', 's.snap', '--verify']).options, { restore: 's.snap', verify: true });
  t.same(parseRunArgs(['a.bin', 'b.bin']).extraImages, 1);
  t.equal(parseRunArgs(['--help', '--vcpus', '999']).help, true, 'help before any check');
  throwsArgError(t, () => parseRunArgs(['a.bin', '--irqchip', '--no-irqchip']), 'ERR_INVALID_ARG_VALUE', '--irqchip and --no-irqchip: give one');
  throwsArgError(t, () => parseRunArgs(['a.bin', '--dirty-log', 'x']), 'ERR_INVALID_ARG_VALUE', "--dirty-log must be bitmap or ring, got 'x'");
  throwsArgError(t, () => parseRunArgs(['a.bin', '--load-addr', 'low']), 'ERR_INVALID_ARG_VALUE', "--load-addr: 'low' is not an address (decimal or 0x hex)");
});

t.test('a configuration file: the options by name, checked, and overridden by the command line', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'machine.json');
  writeFileSync(file, JSON.stringify({ image: 'guest.bin', memory: '16M', vcpus: 2, disk: 'a.img,ro', irqchip: false, 'exit-stats': true, 'dirty-log': 'ring' }));
  const fromFile = readRunConfig(file);
  t.same(fromFile, { image: 'guest.bin', memory: '16M', vcpus: '2', disk: ['a.img,ro'], irqchip: false, exitStats: true, dirtyLog: 'ring' });
  t.same(parseRunArgs(['--config', file, '--vcpus', '4', '--irqchip']).options,
    { image: 'guest.bin', memory: '16M', vcpus: '4', disk: ['a.img,ro'], irqchip: true, exitStats: true, dirtyLog: 'ring' }, 'the command line wins');
  t.same(parseRunArgs(['--config', file, '--restore', 's.snap']).options.image, undefined, "a source given replaces the file's");
  t.same(mergeRunOptions({ disk: ['a'] }, { disk: ['b', 'c'] }), { disk: ['b', 'c'] }, 'a repeated option is replaced whole');
  t.same(runOptionsToConfig({ image: 'g.bin', loadAddr: '0x1000', irqchip: false, cpuAffinity: ['0'] }), { image: 'g.bin', 'load-addr': '0x1000', irqchip: false, 'cpu-affinity': ['0'] });
  t.same(runOptionsFromConfig({ 'no-verify': true, restore: 's' }, 'f.json'), { verify: false, restore: 's' });

  throwsArgError(t, () => runOptionsFromConfig({ memroy: '1M' }, 'f.json'), 'ERR_INVALID_ARG_VALUE', /^f\.json: unknown field 'memroy' \(fields: image, mode, load-addr, memory, /);
  throwsArgError(t, () => runOptionsFromConfig({ memory: '4G' }, 'f.json'), 'ERR_INVALID_ARG_VALUE', "f.json: field 'memory': '4G' is too large: at most 3 GiB");
  throwsArgError(t, () => runOptionsFromConfig({ vcpus: 300 }, 'f.json'), 'ERR_INVALID_ARG_VALUE', "f.json: field 'vcpus' must be an integer from 1 to 255, got '300'");
  throwsArgError(t, () => runOptionsFromConfig({ vcpus: true }, 'f.json'), 'ERR_INVALID_ARG_TYPE', "f.json: field 'vcpus' must be a string or a number, got true");
  throwsArgError(t, () => runOptionsFromConfig({ irqchip: 'no' }, 'f.json'), 'ERR_INVALID_ARG_TYPE', 'f.json: field \'irqchip\' must be true or false, got "no"');
  throwsArgError(t, () => runOptionsFromConfig({ disk: [1, {}] }, 'f.json'), 'ERR_INVALID_ARG_TYPE', "f.json: field 'disk' must be a string or an array of strings, got {}");
  throwsArgError(t, () => runOptionsFromConfig({ disk: ',ro' }, 'f.json'), 'ERR_INVALID_ARG_VALUE', "f.json: field 'disk' needs a file: --disk FILE[,ro][,id=ID], got ',ro'");
  throwsArgError(t, () => runOptionsFromConfig({ irqchip: true, 'no-irqchip': true }, 'f.json'), 'ERR_INVALID_ARG_VALUE', "f.json: fields 'irqchip' and 'no-irqchip': give one");
  throwsArgError(t, () => runOptionsFromConfig({ help: true }, 'f.json'), 'ERR_INVALID_ARG_VALUE', /^f\.json: unknown field 'help'/);
  throwsArgError(t, () => runOptionsFromConfig([], 'f.json'), 'ERR_INVALID_ARG_TYPE', "f.json: a configuration is a JSON object of run's options");
  writeFileSync(file, '{"memory": ');
  throwsArgError(t, () => readRunConfig(file), 'ERR_INVALID_ARG_VALUE', new RegExp(`^--config ${file}: not JSON: `));
  t.throws(() => readRunConfig(path.join(dir, 'none.json')), { message: new RegExp(`^--config ${dir}/none.json: ENOENT`) });
});

t.test('a mistyped command shares one code cache; each command has its own', async (t) => {
  t.equal(codeCacheUse('run'), 'run');
  t.equal(codeCacheUse('config'), 'config');
  t.equal(codeCacheUse('rnu'), 'other');
  t.equal(codeCacheUse('--version'), 'other');
  t.equal(codeCacheUse(undefined), 'other');
});
