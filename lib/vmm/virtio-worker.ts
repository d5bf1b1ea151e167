// A virtio device's own thread. It waits on the device's notify eventfd, which KVM signals from
// an ioeventfd when the guest writes QueueNotify (no VM exit reaches userspace), serves the
// queues, and raises the interrupt through an irqfd. The vCPUs run on meanwhile. The machine
// pauses it (for snapshots and migration) through a control word: it stops between two
// requests, and parks.
//
// A disk sleeps in read(2) on the eventfd and serves its queue with synchronous file I/O. Every
// other device serves its queues on this thread's event loop, beside the host fds and sockets it
// talks to (a TAP, unix sockets), with the eventfd watched like them.
import { readSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { VirtioBlkDevice } from '../devices/virtio-blk.js';
import type { VirtioDeviceContext, VirtioQueueDevice } from '../devices/virtio-device.js';
import { VirtioMmio } from '../devices/virtio-mmio.js';
import { VirtioRngDevice } from '../devices/virtio-rng.js';
import { VirtioNetDevice } from '../devices/virtio-net.js';
import { VirtioVsockDevice } from '../devices/virtio-vsock.js';
import { argValueError } from '../kvm/errors.js';
import { watchFd } from '../kvm/fd-watch.js';
import { GuestMemory } from '../kvm/memory.js';
import { setThreadName } from '../kvm/thread.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { RunState } from './control.js';
import { DEVICE_PARKED, DEVICE_RESTORES, DEVICE_STATE, type VirtioDeviceData, type VirtioWorkerData, type VirtioWorkerMessage } from './virtio-control.js';

const data = workerData as VirtioWorkerData;
const post = (message: VirtioWorkerMessage) => parentPort!.postMessage(message);
const log = (message: string) => post({ type: 'log', message });
setThreadName(data.name);

const control = new Int32Array(data.control);
const memory = GuestMemory.attach(data.memory);
const dirty = DirtyBitmap.attach(data.dirtyBitmap, data.memoryPages);
const mmio = new VirtioMmio(data.mmio, data.name, log);
const eventWord = Buffer.alloc(8);
/** How long a disk polls its ring after serving requests before sleeping on the eventfd. */
const POLL_MS = 0.05;

if (data.device.kind === 'blk') runDisk(data.device);
else runOnEventLoop(data.device);

function runDisk(config: Extract<VirtioDeviceData, { kind: 'blk' }>): void {
  const device = new VirtioBlkDevice({ mmio, ram: memory.bytes(), dirty, disk: config.disk, log });
  const running = () => Atomics.load(control, DEVICE_STATE) === RunState.Running;
  const flush = () => {
    try {
      device.flush();
    } catch (e) {
      log(`${data.name}: flushing the disk before pausing failed: ${(e as Error).message}`);
    }
  };
  let error: string | undefined;
  try {
    for (;;) {
      const state = Atomics.load(control, DEVICE_STATE);
      if (state === RunState.Stopping) break;
      if (state !== RunState.Running) {
        flush();
        park();
        continue;
      }
      // After work, a short look at the ring before sleeping: a driver that issues its next
      // request soon after a completion (sequential I/O) finds us awake, and need not notify.
      if (device.serve(running) > 0 && device.pollForRequests(POLL_MS, running)) continue;
      // Sleeps until the guest notifies (or the machine wants us): a notify that came while we
      // served is still counted in the eventfd, so none is lost.
      readSync(data.notifyFd, eventWord, 0, 8, null);
    }
  } catch (e) {
    error = (e as Error)?.message ?? String(e);
  } finally {
    memory.close();
  }
  post({ type: 'done', error });
}

function createDevice(config: VirtioDeviceData, context: VirtioDeviceContext): VirtioQueueDevice {
  switch (config.kind) {
    case 'rng': return new VirtioRngDevice(context);
    case 'net': return new VirtioNetDevice(context, config);
    case 'vsock': return new VirtioVsockDevice(context, config.vsock);
    case 'blk': break;
  }
  throw argValueError(`no event-loop device of kind ${config.kind}`);
}

function runOnEventLoop(config: VirtioDeviceData): void {
  const context: VirtioDeviceContext = { mmio, ram: memory.bytes(), dirty, log, watch: watchFd };
  let device: VirtioQueueDevice;
  try {
    device = createDevice(config, context);
  } catch (e) {
    memory.close();
    post({ type: 'done', error: (e as Error)?.message ?? String(e) });
    return;
  }
  let restores = Atomics.load(control, DEVICE_RESTORES);
  const end = (error?: string) => {
    notify.close();
    try {
      device.close();
    } catch (e) {
      error ??= (e as Error).message;
    }
    memory.close();
    post({ type: 'done', error });
    // Whatever the device left on the loop (a socket closing) must not keep the thread: it ends
    // once this event is over.
    setImmediate(() => process.exit(0));
  };
  const onNotify = () => {
    try {
      readSync(data.notifyFd, eventWord, 0, 8, null);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
    }
    try {
      let state = Atomics.load(control, DEVICE_STATE);
      if (state !== RunState.Running && state !== RunState.Stopping) {
        device.parking();
        park();
        const now = Atomics.load(control, DEVICE_RESTORES);
        device.resumed(now !== restores);
        restores = now;
        state = Atomics.load(control, DEVICE_STATE);
      }
      if (state === RunState.Stopping) {
        device.parking();
        end();
        return;
      }
      device.notified();
    } catch (e) {
      end((e as Error)?.message ?? String(e));
    }
  };
  const notify = watchFd(data.notifyFd, onNotify);
  // It starts parked, as a disk does: the machine may restore its registers first.
  onNotify();
}

/** Stays parked while the machine is paused. */
function park(): void {
  Atomics.store(control, DEVICE_PARKED, 1);
  Atomics.notify(control, DEVICE_PARKED);
  for (let state = Atomics.load(control, DEVICE_STATE); state === RunState.Created || state === RunState.Paused; state = Atomics.load(control, DEVICE_STATE)) {
    Atomics.wait(control, DEVICE_STATE, state);
  }
  Atomics.store(control, DEVICE_PARKED, 0);
}
