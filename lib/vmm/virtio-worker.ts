// A virtio block device's own thread. It sleeps in read(2) on the device's notify eventfd (which
// KVM signals from an ioeventfd when the guest writes QueueNotify, without a VM exit reaching
// userspace), serves the queue with synchronous file I/O, and raises the interrupt through an
// irqfd. The vCPUs run on meanwhile. The machine pauses it (for snapshots and migration) through
// a control word: it stops between two requests, flushes what it wrote, and parks.
import { readSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { VirtioBlkDevice } from '../devices/virtio-blk.js';
import { VirtioMmio } from '../devices/virtio-mmio.js';
import { GuestMemory } from '../kvm/memory.js';
import { setThreadName } from '../kvm/thread.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { RunState } from './control.js';
import { DEVICE_PARKED, DEVICE_STATE, type VirtioWorkerData, type VirtioWorkerMessage } from './virtio-control.js';

const data = workerData as VirtioWorkerData;
const post = (message: VirtioWorkerMessage) => parentPort!.postMessage(message);
const log = (message: string) => post({ type: 'log', message });
setThreadName(data.name);

const control = new Int32Array(data.control);
const memory = GuestMemory.attach(data.memory);
const dirty = DirtyBitmap.attach(data.dirtyBitmap, data.memoryPages);
const device = new VirtioBlkDevice({ mmio: new VirtioMmio(data.mmio, data.name, log), ram: memory.bytes(), dirty, disk: data.disk, log });
const running = () => Atomics.load(control, DEVICE_STATE) === RunState.Running;
const eventWord = Buffer.alloc(8);
/** How long to poll the ring after serving requests before sleeping on the eventfd. */
const POLL_MS = 0.05;

let error: string | undefined;
try {
  loop();
} catch (e) {
  error = (e as Error)?.message ?? String(e);
} finally {
  memory.close();
}
post({ type: 'done', error });

function loop(): void {
  for (;;) {
    const state = Atomics.load(control, DEVICE_STATE);
    if (state === RunState.Stopping) return;
    if (state !== RunState.Running) {
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
}

/** Stays parked while the machine is paused. */
function park(): void {
  try {
    device.flush();
  } catch (e) {
    log(`${data.name}: flushing the disk before pausing failed: ${(e as Error).message}`);
  }
  Atomics.store(control, DEVICE_PARKED, 1);
  Atomics.notify(control, DEVICE_PARKED);
  for (let state = Atomics.load(control, DEVICE_STATE); state === RunState.Created || state === RunState.Paused; state = Atomics.load(control, DEVICE_STATE)) {
    Atomics.wait(control, DEVICE_STATE, state);
  }
  Atomics.store(control, DEVICE_PARKED, 0);
}
