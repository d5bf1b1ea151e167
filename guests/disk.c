/*
 * disk.c - a virtio-blk client for the VMM's virtio-mmio block devices: checks them, keeps I/O
 * in flight for snapshot and migration tests, drives the device into every error it must
 * survive, or benchmarks it. Runs at CPL 3 on the runtime in guests/rt/ (rt.h).
 *
 * Run: node-kvm run guests/build/disk.elf --disk FILE[,ro] (needs at least one --disk).
 *
 * Contract with the host:
 *   - ELF64 linked at 1 MiB (rt.ld), entered by the VMM's ELF64 loader in long mode with
 *     RBX = hvm_start_info; its memory map gives the end of RAM.
 *   - Devices: virtio-mmio (virtio 1.x, register layout version 2) at 0xd0000000 + i * 0x1000,
 *     i = 0..7, one per disk in order; the scan ends at the first slot whose MagicValue is not
 *     "virt" (0x74726976). Slots whose DeviceID is not 2 (block) are skipped. Disk i below is
 *     the device in slot i; "disk 0" in modes 1-3 is the first block device.
 *     The driver accepts VIRTIO_F_VERSION_1 (required), VIRTIO_BLK_F_RO, BLK_SIZE, FLUSH,
 *     SEG_MAX, DISCARD, WRITE_ZEROES, VIRTIO_F_RING_INDIRECT_DESC and RING_EVENT_IDX when
 *     offered, uses queue 0 (the largest power of two up to min(QueueNumMax, 256) entries), and
 *     polls the used ring (about 5 s per completion before it reports a timeout; no interrupts).
 *   - Parameters at guest-physical 0x5000 (written by the host before boot; all zero =
 *     defaults):
 *       0x5000 u32 mode: 0 check, 1 loop, 2 hostile, 3 bench
 *       0x5004 u32 rounds (loop; 0 = forever)
 *       0x5008 u32 request bytes (bench; a multiple of 512; default 64 KiB)
 *       0x500c u32 total bytes (bench; default 16 MiB)
 *       0x5010 u32 bench op: 0 read, 1 write
 *       0x5014 u32 queue depth (bench, loop; default 1 for bench, 4 for loop; at most 16)
 *       0x5018 u32 feature bits 0-31 to decline even when offered (0 = none), e.g. 1 << 29 to
 *                  run without VIRTIO_F_RING_EVENT_IDX
 *   - Output on COM1, one line each. Exit through isa-debug-exit (port 0xf4): 0x10 (process
 *     status 0x21) on success, 0x7f after "... BAD: <what>", 0x7e (status 0xfd) after
 *     "disk: no virtio-blk device found", 0x7d after an unexpected CPU exception (rt.h).
 *
 * Mode 0, check: for every disk i,
 *     disk<i>: <capacity> sectors, <ro|rw>, id "<id>"       (GET_ID, up to 20 bytes, to a NUL)
 *     disk<i>: sector 0 says "<text>"        (up to the first '\n' or NUL, at most 64 bytes)
 *   then a 4 KiB write of sectors 8-15, byte k of sector s = (s * 31 + k + i) & 0xff:
 *     rw: FLUSH, read back into a cleared buffer (through an indirect table of two 2 KiB
 *         buffers when VIRTIO_F_RING_INDIRECT_DESC is negotiated), compare:
 *         disk<i>: wrote sectors 8-15, flushed, read back ok
 *         (without VIRTIO_BLK_F_FLUSH: "disk<i>: wrote sectors 8-15, read back ok (no flush)")
 *     ro: the write must complete with IOERR:  disk<i>: write refused (read-only)
 *   rw with WRITE_ZEROES: write the same pattern to sectors 16-23, write-zeroes them (flags 0),
 *     read back all zero:  disk<i>: write-zeroes ok
 *   rw with DISCARD: discard sectors 24-31, status OK:  disk<i>: discard ok
 *   then "disk: <n> disks checked", exit 0x10. A failure prints "disk<i> BAD: <what>", exits
 *   0x7f. No block device: "disk: no virtio-blk device found", exit 0x7e.
 * Mode 1, loop (for snapshots and migration in the middle of I/O), disk 0: round r = 0, 1, ...
 *   submits `depth` writes at once (request j: 16 KiB at sector 64 + 32 j, byte k of sector s =
 *   (s * 7 + k + r) & 0xff), one notify, waits for all; FLUSH (when negotiated); then `depth`
 *   reads at once into cleared buffers; verifies; prints "round <r> ok". A mismatch prints
 *   "disk0 BAD: round <r> sector <s>" and exits 0x7f. After `rounds` rounds (when not 0):
 *   "loop done", exit 0x10.
 * Mode 2, hostile, disk 0: reads sector 0 as a reference, then drives the device into each
 *   failure, one case at a time, printing "hostile <case>: <outcome>", outcome one of
 *   "needs-reset" (Status has DEVICE_NEEDS_RESET and InterruptStatus bit 1; without that bit:
 *   "needs-reset without a config-change interrupt"), "status <n>" (the request completed; 255
 *   when the device did not write the status byte), "ignored" (nothing happened within about
 *   0.2 s, where that is expected) or "timeout" (nothing happened within about 5 s, where
 *   something should have). After every needs-reset: reset, re-init, read sector 0 and compare,
 *   "hostile <case>: recovered" (or "hostile <case>: not recovered: <what>", exit 0x7f).
 *   Cases, in this order:
 *     desc-outside-ram      a read into 0xf0000000                                  needs-reset
 *     length-overflow       a read into 0x2000 bytes at 0xfffffffffffff000           needs-reset
 *     next-out-of-range     a header descriptor with NEXT, next = 300                needs-reset
 *     loop                  a write: header -> data -> header                        needs-reset
 *     indirect-outside-ram  an indirect table at 0xf0000000                          needs-reset
 *     indirect-bad-length   an indirect table of 24 bytes                            needs-reset
 *     indirect-nested       an indirect table holding an INDIRECT descriptor         needs-reset
 *     avail-too-far         avail idx advanced by queue size + 1                     needs-reset
 *     queue-size-3          QueueNum 3, QueueReady 1 (QueueReady must read back 0)   needs-reset
 *     ring-outside-ram      QueueDesc 0xf0000000, QueueReady 1                       needs-reset
 *     not-ready-notify      a read queued on queue 0 before QueueReady, notify 0     ignored
 *     bad-queue-notify      a read queued on queue 0, notify queue 5                 ignored
 *     past-capacity         a read at sector = capacity                              status 1
 *     unknown-type          request type 99                                          status 2
 *     wrong-direction       a read whose data descriptor is device-readable          status 1
 *   The indirect cases print "hostile <case>: skipped (no VIRTIO_F_RING_INDIRECT_DESC)" when
 *   the device does not offer it. After the two ignored cases the queued read must still
 *   complete once the queue is ready / queue 0 is notified; if it does not, "hostile <case>:
 *   then <what>". Then "hostile: done", exit 0x10.
 * Mode 3, bench, disk 0: sequential requests of `request bytes` from sector 0 (wrapping to 0
 *   where a request would pass the capacity) until `total bytes` (rounded up to whole
 *   requests), op read or write, `depth` in flight. "bench start" before the first request,
 *   "bench done <requests>" after the last completes, exit 0x10. Data buffers: depth x request
 *   bytes (at most 16 MiB) at the fixed address 4 MiB (RT_FREE_RAM); RAM must reach that far.
 *   Written data is whatever those buffers hold (zero on a fresh guest).
 */
#include "rt/virtio-blk.h"

#define MODE_CHECK 0
#define MODE_LOOP 1
#define MODE_HOSTILE 2
#define MODE_BENCH 3

#define EXIT_OK 0x10
#define EXIT_NO_DEVICE 0x7e
#define EXIT_BAD 0x7f

#define SECTOR VIRTIO_BLK_SECTOR_BYTES
#define MAX_DEPTH 16

#define LOOP_DEFAULT_DEPTH 4
#define LOOP_FIRST_SECTOR 64
#define LOOP_REQUEST_BYTES (16 * 1024)
#define LOOP_REQUEST_SECTORS (LOOP_REQUEST_BYTES / SECTOR)
#define LOOP_STRIDE_SECTORS 32

#define BENCH_DEFAULT_REQUEST_BYTES (64 * 1024)
#define BENCH_DEFAULT_TOTAL_BYTES (16 * 1024 * 1024)
#define BENCH_BUFFER_BYTES (16 * 1024 * 1024)
#define BENCH_OP_WRITE 1

#define CHECK_SECTORS_NEEDED 32
#define SECTOR0_TEXT_MAX 64

#define HOSTILE_IGNORE_SPINS (200 * RT_SPINS_PER_MS)
/* Polls of the used ring between reads of Status (each a VM exit). */
#define HOSTILE_STATUS_CHECK_SPINS 16384
/* Beyond the end of any RAM these tests give a guest, and no device's MMIO. */
#define HOSTILE_OUTSIDE_RAM 0xf0000000UL
#define HOSTILE_NONEXISTENT_QUEUE 5
#define HOSTILE_UNKNOWN_TYPE 99

struct disk_params {
	uint32_t mode;
	uint32_t rounds;
	uint32_t request_bytes;
	uint32_t total_bytes;
	uint32_t bench_op;
	uint32_t depth;
	uint32_t declined_features;
};

static struct disk_params params;
static uint64_t declined_features;

static struct virtq_memory ring_memory[VBLK_MMIO_SLOTS];
static struct vblk disks[VBLK_MMIO_SLOTS];
static struct vblk_request requests[MAX_DEPTH];

static uint8_t write_buffer[MAX_DEPTH][LOOP_REQUEST_BYTES] __attribute__((aligned(4096)));
static uint8_t read_buffer[MAX_DEPTH][LOOP_REQUEST_BYTES] __attribute__((aligned(4096)));
static uint8_t sector0[SECTOR] __attribute__((aligned(SECTOR)));
static uint8_t id[VIRTIO_BLK_ID_BYTES + 1];
static struct virtio_blk_discard_write_zeroes range __attribute__((aligned(16)));

/* ---- output ---- */

static void put_result(int result)
{
	if (result == VBLK_TIMEOUT)
		puts("timeout");
	else if (result == VBLK_NEEDS_RESET)
		puts("the device needs a reset");
	else if (result == VBLK_QUEUE_FULL)
		puts("the queue is full");
	else {
		puts("status ");
		put_dec((uint64_t)result);
	}
}

static void put_disk(int slot)
{
	puts("disk");
	put_dec((uint64_t)slot);
}

__attribute__((noreturn)) static void bad(int slot, const char *what)
{
	put_disk(slot);
	puts(" BAD: ");
	puts(what);
	putc('\n');
	debug_exit(EXIT_BAD);
}

/* "disk<i> BAD: <what>: <result>" */
__attribute__((noreturn)) static void bad_result(int slot, const char *what, int result)
{
	put_disk(slot);
	puts(" BAD: ");
	puts(what);
	puts(": ");
	put_result(result);
	putc('\n');
	debug_exit(EXIT_BAD);
}

/* ---- helpers ---- */

static void fill_pattern(uint8_t *buffer, uint64_t first_sector, uint32_t sectors, uint64_t multiplier, uint64_t offset)
{
	for (uint32_t n = 0; n < sectors; n++) {
		uint64_t base = (first_sector + n) * multiplier + offset;
		for (uint32_t k = 0; k < SECTOR; k++)
			buffer[n * SECTOR + k] = (uint8_t)(base + k);
	}
}

static bool all_zero(const uint8_t *buffer, size_t bytes)
{
	for (size_t i = 0; i < bytes; i++) {
		if (buffer[i] != 0)
			return false;
	}
	return true;
}

/* The slot of the first block device, or -1. */
static int first_block_slot(int slots)
{
	for (int slot = 0; slot < slots; slot++) {
		if (virtio_mmio_read(vblk_slot_base(slot), VIRTIO_MMIO_DEVICE_ID) == VIRTIO_ID_BLOCK)
			return slot;
	}
	return -1;
}

__attribute__((noreturn)) static void no_device(void)
{
	puts("disk: no virtio-blk device found\n");
	debug_exit(EXIT_NO_DEVICE);
}

static struct vblk *init_disk(int slot)
{
	struct vblk *disk = &disks[slot];
	const char *failure = vblk_init(disk, vblk_slot_base(slot), &ring_memory[slot], declined_features);
	if (failure != NULL)
		bad(slot, failure);
	return disk;
}

/* ---- mode 0: check ---- */

static void check_disk(int slot)
{
	struct vblk *disk = init_disk(slot);
	bool read_only = vblk_has(disk, VIRTIO_BLK_F_RO);
	uint8_t *buffer = write_buffer[0], *readback = read_buffer[0];

	memset(id, 0, sizeof(id));
	int result = vblk_do(disk, VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES);
	if (result != VIRTIO_BLK_S_OK)
		bad_result(slot, "GET_ID", result);
	put_disk(slot);
	puts(": ");
	put_dec(disk->capacity);
	puts(read_only ? " sectors, ro, id \"" : " sectors, rw, id \"");
	puts((const char *)id);
	puts("\"\n");

	result = vblk_do(disk, VIRTIO_BLK_T_IN, 0, sector0, SECTOR);
	if (result != VIRTIO_BLK_S_OK)
		bad_result(slot, "read of sector 0", result);
	put_disk(slot);
	puts(": sector 0 says \"");
	for (int i = 0; i < SECTOR0_TEXT_MAX && sector0[i] != 0 && sector0[i] != '\n'; i++)
		putc((char)sector0[i]);
	puts("\"\n");

	if (disk->capacity < CHECK_SECTORS_NEEDED)
		bad(slot, "the checks need 32 sectors");

	fill_pattern(buffer, 8, 8, 31, (uint64_t)slot);
	result = vblk_do(disk, VIRTIO_BLK_T_OUT, 8, buffer, 8 * SECTOR);
	if (read_only) {
		if (result != VIRTIO_BLK_S_IOERR)
			bad_result(slot, "write to a read-only disk (IOERR expected)", result);
		put_disk(slot);
		puts(": write refused (read-only)\n");
		return;
	}
	if (result != VIRTIO_BLK_S_OK)
		bad_result(slot, "write of sectors 8-15", result);
	bool flush = vblk_has(disk, VIRTIO_BLK_F_FLUSH);
	if (flush) {
		result = vblk_do(disk, VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
		if (result != VIRTIO_BLK_S_OK)
			bad_result(slot, "flush", result);
	}
	memset(readback, 0, 8 * SECTOR);
	bool two_buffers = vblk_has(disk, VIRTIO_F_RING_INDIRECT_DESC) && (!vblk_has(disk, VIRTIO_BLK_F_SEG_MAX) || disk->seg_max >= 2);
	if (two_buffers) {
		struct virtq_buffer halves[2] = {
			{ (uintptr_t)readback, 4 * SECTOR, true },
			{ (uintptr_t)readback + 4 * SECTOR, 4 * SECTOR, true },
		};
		if (!vblk_submit(disk, &requests[0], VIRTIO_BLK_T_IN, 8, halves, 2, true))
			bad(slot, "no room in the queue");
		vblk_kick(disk);
		result = vblk_wait(disk, &requests[0]);
	} else {
		result = vblk_do(disk, VIRTIO_BLK_T_IN, 8, readback, 8 * SECTOR);
	}
	if (result != VIRTIO_BLK_S_OK)
		bad_result(slot, "read of sectors 8-15", result);
	if (memcmp(buffer, readback, 8 * SECTOR) != 0)
		bad(slot, "sectors 8-15 read back differ from what was written");
	put_disk(slot);
	puts(flush ? ": wrote sectors 8-15, flushed, read back ok\n" : ": wrote sectors 8-15, read back ok (no flush)\n");

	if (vblk_has(disk, VIRTIO_BLK_F_WRITE_ZEROES)) {
		if (disk->max_write_zeroes_sectors < 8 || disk->max_write_zeroes_seg < 1)
			bad(slot, "WRITE_ZEROES offered with max_write_zeroes_sectors < 8 or max_write_zeroes_seg 0");
		fill_pattern(buffer, 16, 8, 31, (uint64_t)slot);
		result = vblk_do(disk, VIRTIO_BLK_T_OUT, 16, buffer, 8 * SECTOR);
		if (result != VIRTIO_BLK_S_OK)
			bad_result(slot, "write of sectors 16-23", result);
		range = (struct virtio_blk_discard_write_zeroes){ 16, 8, 0 };
		result = vblk_do(disk, VIRTIO_BLK_T_WRITE_ZEROES, 0, &range, sizeof(range));
		if (result != VIRTIO_BLK_S_OK)
			bad_result(slot, "write-zeroes of sectors 16-23", result);
		memset(readback, 0xa5, 8 * SECTOR);
		result = vblk_do(disk, VIRTIO_BLK_T_IN, 16, readback, 8 * SECTOR);
		if (result != VIRTIO_BLK_S_OK)
			bad_result(slot, "read of sectors 16-23", result);
		if (!all_zero(readback, 8 * SECTOR))
			bad(slot, "sectors 16-23 are not zero after write-zeroes");
		put_disk(slot);
		puts(": write-zeroes ok\n");
	}

	if (vblk_has(disk, VIRTIO_BLK_F_DISCARD)) {
		if (disk->max_discard_sectors < 8 || disk->max_discard_seg < 1)
			bad(slot, "DISCARD offered with max_discard_sectors < 8 or max_discard_seg 0");
		range = (struct virtio_blk_discard_write_zeroes){ 24, 8, 0 };
		result = vblk_do(disk, VIRTIO_BLK_T_DISCARD, 0, &range, sizeof(range));
		if (result != VIRTIO_BLK_S_OK)
			bad_result(slot, "discard of sectors 24-31", result);
		put_disk(slot);
		puts(": discard ok\n");
	}
}

static void check(int slots)
{
	int checked = 0;
	for (int slot = 0; slot < slots; slot++) {
		if (virtio_mmio_read(vblk_slot_base(slot), VIRTIO_MMIO_DEVICE_ID) != VIRTIO_ID_BLOCK)
			continue;
		check_disk(slot);
		checked++;
	}
	if (checked == 0)
		no_device();
	puts("disk: ");
	put_dec((uint64_t)checked);
	puts(" disks checked\n");
	debug_exit(EXIT_OK);
}

/* ---- mode 1: loop ---- */

static uint32_t queue_depth(uint32_t default_depth)
{
	uint32_t depth = params.depth == 0 ? default_depth : params.depth;
	return depth > MAX_DEPTH ? MAX_DEPTH : depth;
}

/* Submits `depth` requests of LOOP_REQUEST_BYTES at once (request j from `buffers[j]`, at
 * sector 64 + 32 j), one kick, and waits for them all. */
static void loop_batch(int slot, struct vblk *disk, uint32_t type, uint8_t (*buffers)[LOOP_REQUEST_BYTES], uint32_t depth, uint64_t round)
{
	for (uint32_t j = 0; j < depth; j++) {
		struct virtq_buffer data = { (uintptr_t)buffers[j], LOOP_REQUEST_BYTES, type == VIRTIO_BLK_T_IN };
		if (!vblk_submit(disk, &requests[j], type, LOOP_FIRST_SECTOR + j * LOOP_STRIDE_SECTORS, &data, 1, false))
			bad(slot, "no room in the queue");
	}
	vblk_kick(disk);
	for (uint32_t j = 0; j < depth; j++) {
		int result = vblk_wait(disk, &requests[j]);
		if (result != VIRTIO_BLK_S_OK) {
			put_disk(slot);
			puts(" BAD: round ");
			put_dec(round);
			puts(type == VIRTIO_BLK_T_IN ? " read " : " write ");
			put_dec(j);
			puts(": ");
			put_result(result);
			putc('\n');
			debug_exit(EXIT_BAD);
		}
	}
}

static void loop(int slot)
{
	struct vblk *disk = init_disk(slot);
	uint32_t depth = queue_depth(LOOP_DEFAULT_DEPTH);
	if (disk->capacity < LOOP_FIRST_SECTOR + depth * LOOP_STRIDE_SECTORS)
		bad(slot, "the disk is too small for the loop's requests");
	for (uint64_t round = 0; params.rounds == 0 || round < params.rounds; round++) {
		for (uint32_t j = 0; j < depth; j++)
			fill_pattern(write_buffer[j], LOOP_FIRST_SECTOR + j * LOOP_STRIDE_SECTORS, LOOP_REQUEST_SECTORS, 7, round);
		loop_batch(slot, disk, VIRTIO_BLK_T_OUT, write_buffer, depth, round);
		if (vblk_has(disk, VIRTIO_BLK_F_FLUSH)) {
			int result = vblk_do(disk, VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
			if (result != VIRTIO_BLK_S_OK)
				bad_result(slot, "flush", result);
		}
		memset(read_buffer, 0, sizeof(read_buffer[0]) * depth);
		loop_batch(slot, disk, VIRTIO_BLK_T_IN, read_buffer, depth, round);
		for (uint32_t j = 0; j < depth; j++) {
			for (uint32_t n = 0; n < LOOP_REQUEST_SECTORS; n++) {
				if (memcmp(write_buffer[j] + n * SECTOR, read_buffer[j] + n * SECTOR, SECTOR) == 0)
					continue;
				put_disk(slot);
				puts(" BAD: round ");
				put_dec(round);
				puts(" sector ");
				put_dec(LOOP_FIRST_SECTOR + j * LOOP_STRIDE_SECTORS + n);
				putc('\n');
				debug_exit(EXIT_BAD);
			}
		}
		puts("round ");
		put_dec(round);
		puts(" ok\n");
	}
	puts("loop done\n");
	debug_exit(EXIT_OK);
}

/* ---- mode 2: hostile ---- */

enum hostile_outcome { NEEDS_RESET, NEEDS_RESET_NO_INTERRUPT, COMPLETED, NOTHING };

static struct vblk *hostile_disk;
static int hostile_slot;
static struct vblk_request hostile_request;
static uint8_t hostile_data[SECTOR] __attribute__((aligned(SECTOR)));
static struct virtq_desc hostile_tables[2][4] __attribute__((aligned(16)));

static void hostile_line(const char *name, const char *text)
{
	puts("hostile ");
	puts(name);
	puts(": ");
	puts(text);
}

/* Publishes the available ring and notifies queue `queue` whatever the device asked for. */
static void publish_and_notify(uint16_t queue)
{
	struct virtq *vq = &hostile_disk->vq;
	virtq_publish(vq);
	vq->notified_avail = vq->next_avail;
	memory_barrier();
	virtio_mmio_notify(hostile_disk->base, queue);
}

/* Waits up to `spins` for a completion (of anything on the queue) or DEVICE_NEEDS_RESET. */
static enum hostile_outcome observe(unsigned long spins, uint8_t *status)
{
	struct virtq *vq = &hostile_disk->vq;
	uint16_t used_before = vq->last_used;
	for (unsigned long spin = 0; spin < spins; spin++) {
		if (vq->used->idx != used_before) {
			compiler_barrier();
			*status = hostile_request.status;
			return COMPLETED;
		}
		/* Status is a VM exit: read it now and then. */
		if (spin % HOSTILE_STATUS_CHECK_SPINS == 0) {
			uint32_t device_status = virtio_mmio_status(hostile_disk->base);
			if (device_status & VIRTIO_STATUS_DEVICE_NEEDS_RESET) {
				uint32_t interrupts = virtio_mmio_read(hostile_disk->base, VIRTIO_MMIO_INTERRUPT_STATUS);
				virtio_mmio_write(hostile_disk->base, VIRTIO_MMIO_INTERRUPT_ACK, interrupts);
				return interrupts & VIRTIO_MMIO_INT_CONFIG ? NEEDS_RESET : NEEDS_RESET_NO_INTERRUPT;
			}
		}
		cpu_relax();
	}
	return NOTHING;
}

static void hostile_reinit(const char *name, bool report)
{
	const char *failure = vblk_init(hostile_disk, hostile_disk->base, &ring_memory[hostile_slot], declined_features);
	int result = VIRTIO_BLK_S_OK;
	if (failure == NULL && report) {
		memset(hostile_data, 0, SECTOR);
		result = vblk_do(hostile_disk, VIRTIO_BLK_T_IN, 0, hostile_data, SECTOR);
		if (result == VIRTIO_BLK_S_OK && memcmp(hostile_data, sector0, SECTOR) != 0)
			failure = "sector 0 reads back different";
	}
	if (failure == NULL && result == VIRTIO_BLK_S_OK) {
		if (report)
			hostile_line(name, "recovered\n");
		return;
	}
	hostile_line(name, report ? "not recovered: " : "re-init failed: ");
	if (failure != NULL)
		puts(failure);
	else {
		puts("read of sector 0: ");
		put_result(result);
	}
	putc('\n');
	debug_exit(EXIT_BAD);
}

/* Prints the outcome; recovers after needs-reset (printing "recovered"), and re-inits quietly
 * after anything else when `reinit` (the case left the queue in a state of its own). */
static void hostile_report(const char *name, enum hostile_outcome outcome, uint8_t status, bool nothing_expected, bool reinit)
{
	switch (outcome) {
	case NEEDS_RESET:
		hostile_line(name, "needs-reset\n");
		break;
	case NEEDS_RESET_NO_INTERRUPT:
		hostile_line(name, "needs-reset without a config-change interrupt\n");
		break;
	case COMPLETED:
		hostile_line(name, "status ");
		put_dec(status);
		putc('\n');
		break;
	case NOTHING:
		hostile_line(name, nothing_expected ? "ignored\n" : "timeout\n");
		break;
	}
	if (outcome == NEEDS_RESET || outcome == NEEDS_RESET_NO_INTERRUPT)
		hostile_reinit(name, true);
	else if (reinit)
		hostile_reinit(name, false);
}

/* A request through the driver with these data buffers; the outcome of notifying it. */
static void hostile_request_case(const char *name, uint32_t type, uint64_t sector, const struct virtq_buffer *data, int count, bool reinit)
{
	if (!vblk_submit(hostile_disk, &hostile_request, type, sector, data, count, false))
		bad(hostile_slot, "no room in the queue");
	publish_and_notify(0);
	uint8_t status = 0;
	enum hostile_outcome outcome = observe(hostile_disk->timeout_spins, &status);
	if (outcome == COMPLETED)
		vblk_poll(hostile_disk);
	hostile_report(name, outcome, status, false, reinit);
}

/* A hand-made chain from `head`, put on the available ring and notified. */
static void hostile_chain_case(const char *name, uint16_t head)
{
	struct virtq *vq = &hostile_disk->vq;
	vq->avail->ring[vq->next_avail & (vq->size - 1)] = head;
	vq->next_avail++;
	publish_and_notify(0);
	uint8_t status = 0;
	enum hostile_outcome outcome = observe(hostile_disk->timeout_spins, &status);
	hostile_report(name, outcome, status, false, true);
}

static void set_desc(uint16_t index, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
	volatile struct virtq_desc *desc = &hostile_disk->vq.desc[index];
	desc->addr = addr;
	desc->len = len;
	desc->flags = flags;
	desc->next = next;
}

static void set_table_desc(struct virtq_desc *desc, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
	desc->addr = addr;
	desc->len = len;
	desc->flags = flags;
	desc->next = next;
}

static uint16_t take_descriptors(uint16_t *indexes, int count)
{
	if (virtq_take_descriptors(&hostile_disk->vq, indexes, count) != count)
		bad(hostile_slot, "no room in the queue");
	return indexes[0];
}

static void prepare_request(uint32_t type, uint64_t sector)
{
	hostile_request.header = (struct virtio_blk_req_header){ type, 0, sector };
	hostile_request.status = 0xff;
}

/* A valid three-entry table (header, 512-byte read of sector 0, status). */
static struct virtq_desc *valid_table(void)
{
	struct virtq_desc *table = hostile_tables[0];
	prepare_request(VIRTIO_BLK_T_IN, 0);
	set_table_desc(&table[0], (uintptr_t)&hostile_request.header, sizeof(hostile_request.header), VIRTQ_DESC_F_NEXT, 1);
	set_table_desc(&table[1], (uintptr_t)hostile_data, SECTOR, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
	set_table_desc(&table[2], (uintptr_t)&hostile_request.status, 1, VIRTQ_DESC_F_WRITE, 0);
	return table;
}

static bool indirect_offered(const char *name)
{
	if (vblk_has(hostile_disk, VIRTIO_F_RING_INDIRECT_DESC))
		return true;
	hostile_line(name, "skipped (no VIRTIO_F_RING_INDIRECT_DESC)\n");
	return false;
}

/* Queue 0 set up with `tamper` applied between programming it and QueueReady. */
static void hostile_queue_case(const char *name, void (*tamper)(uintptr_t base))
{
	const char *failure = vblk_init_until_queue(hostile_disk, hostile_disk->base, &ring_memory[hostile_slot], declined_features);
	if (failure != NULL)
		bad(hostile_slot, failure);
	virtio_mmio_queue_program(hostile_disk->base, &hostile_disk->vq);
	tamper(hostile_disk->base);
	virtio_mmio_queue_enable(hostile_disk->base, 0);
	uint8_t status = 0;
	enum hostile_outcome outcome = observe(hostile_disk->timeout_spins, &status);
	bool ready = virtio_mmio_queue_ready(hostile_disk->base, 0);
	if (outcome == NOTHING) {
		hostile_line(name, ready ? "accepted (QueueReady reads 1)\n" : "not accepted, but no needs-reset\n");
		hostile_reinit(name, false);
	} else if (ready && outcome != COMPLETED) {
		hostile_line(name, "needs-reset, but QueueReady reads 1\n");
		hostile_reinit(name, true);
	} else {
		hostile_report(name, outcome, status, false, true);
	}
}

static void queue_num_3(uintptr_t base)
{
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_NUM, 3);
}

static void desc_outside_ram(uintptr_t base)
{
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)HOSTILE_OUTSIDE_RAM);
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
}

/* A read of sector 0 queued but not notified, then `notify` (a queue that cannot take it); then
 * the read must still complete once `enable` makes queue 0 ready and it is notified. */
static void hostile_ignored_case(const char *name, uint16_t notify_queue, bool enable_after)
{
	struct virtq_buffer data = { (uintptr_t)hostile_data, SECTOR, true };
	memset(hostile_data, 0, SECTOR);
	/* A device may serve its queue whenever it wakes (a notify is only a hint): let wake-ups
	 * from the case before (DRIVER_OK, its notify) run out before the request is offered. */
	for (unsigned long i = 0; i < 50 * RT_SPINS_PER_MS; i++)
		cpu_relax();
	if (!vblk_submit(hostile_disk, &hostile_request, VIRTIO_BLK_T_IN, 0, &data, 1, false))
		bad(hostile_slot, "no room in the queue");
	publish_and_notify(notify_queue);
	uint8_t status = 0;
	enum hostile_outcome outcome = observe(HOSTILE_IGNORE_SPINS, &status);
	if (outcome != NOTHING) {
		if (outcome == COMPLETED)
			vblk_poll(hostile_disk);
		hostile_report(name, outcome, status, true, true);
		return;
	}
	hostile_line(name, "ignored\n");
	if (enable_after) {
		const char *failure = vblk_init_finish(hostile_disk);
		if (failure != NULL)
			bad(hostile_slot, failure);
	}
	virtio_mmio_notify(hostile_disk->base, 0);
	int result = vblk_wait(hostile_disk, &hostile_request);
	if (result == VIRTIO_BLK_S_OK && memcmp(hostile_data, sector0, SECTOR) == 0)
		return;
	hostile_line(name, "then the queued read of sector 0: ");
	if (result == VIRTIO_BLK_S_OK)
		puts("wrong data");
	else
		put_result(result);
	putc('\n');
	hostile_reinit(name, false);
}

static void hostile(int slot)
{
	hostile_slot = slot;
	hostile_disk = init_disk(slot);
	struct vblk *disk = hostile_disk;
	int result = vblk_do(disk, VIRTIO_BLK_T_IN, 0, sector0, SECTOR);
	if (result != VIRTIO_BLK_S_OK)
		bad_result(slot, "read of sector 0", result);
	uint16_t d[2];

	struct virtq_buffer outside = { HOSTILE_OUTSIDE_RAM, SECTOR, true };
	hostile_request_case("desc-outside-ram", VIRTIO_BLK_T_IN, 0, &outside, 1, true);

	struct virtq_buffer overflow = { 0xfffffffffffff000UL, 0x2000, true };
	hostile_request_case("length-overflow", VIRTIO_BLK_T_IN, 0, &overflow, 1, true);

	prepare_request(VIRTIO_BLK_T_IN, 0);
	take_descriptors(d, 1);
	set_desc(d[0], (uintptr_t)&hostile_request.header, sizeof(hostile_request.header), VIRTQ_DESC_F_NEXT, 300);
	hostile_chain_case("next-out-of-range", d[0]);

	/* A write whose header and data point at each other: the loop is its only fault. */
	prepare_request(VIRTIO_BLK_T_OUT, 0);
	take_descriptors(d, 2);
	set_desc(d[0], (uintptr_t)&hostile_request.header, sizeof(hostile_request.header), VIRTQ_DESC_F_NEXT, d[1]);
	set_desc(d[1], (uintptr_t)sector0, SECTOR, VIRTQ_DESC_F_NEXT, d[0]);
	hostile_chain_case("loop", d[0]);

	if (indirect_offered("indirect-outside-ram")) {
		take_descriptors(d, 1);
		set_desc(d[0], HOSTILE_OUTSIDE_RAM, 3 * sizeof(struct virtq_desc), VIRTQ_DESC_F_INDIRECT, 0);
		hostile_chain_case("indirect-outside-ram", d[0]);
	}
	if (indirect_offered("indirect-bad-length")) {
		struct virtq_desc *table = valid_table();
		take_descriptors(d, 1);
		set_desc(d[0], (uintptr_t)table, 24, VIRTQ_DESC_F_INDIRECT, 0);
		hostile_chain_case("indirect-bad-length", d[0]);
	}
	if (indirect_offered("indirect-nested")) {
		/* Outer table: the header, then an INDIRECT entry naming an inner table of data + status. */
		struct virtq_desc *outer = hostile_tables[0], *inner = hostile_tables[1];
		prepare_request(VIRTIO_BLK_T_IN, 0);
		set_table_desc(&outer[0], (uintptr_t)&hostile_request.header, sizeof(hostile_request.header), VIRTQ_DESC_F_NEXT, 1);
		set_table_desc(&outer[1], (uintptr_t)inner, 2 * sizeof(struct virtq_desc), VIRTQ_DESC_F_INDIRECT, 0);
		set_table_desc(&inner[0], (uintptr_t)hostile_data, SECTOR, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
		set_table_desc(&inner[1], (uintptr_t)&hostile_request.status, 1, VIRTQ_DESC_F_WRITE, 0);
		take_descriptors(d, 1);
		set_desc(d[0], (uintptr_t)outer, 2 * sizeof(struct virtq_desc), VIRTQ_DESC_F_INDIRECT, 0);
		hostile_chain_case("indirect-nested", d[0]);
	}

	{
		struct virtq *vq = &disk->vq;
		vq->next_avail = (uint16_t)(vq->next_avail + vq->size + 1);
		publish_and_notify(0);
		uint8_t status = 0;
		enum hostile_outcome outcome = observe(disk->timeout_spins, &status);
		hostile_report("avail-too-far", outcome, status, false, true);
	}

	hostile_queue_case("queue-size-3", queue_num_3);
	hostile_queue_case("ring-outside-ram", desc_outside_ram);

	/* Queue 0 programmed but not ready (the device negotiated, DRIVER_OK not yet set). */
	const char *failure = vblk_init_until_queue(disk, disk->base, &ring_memory[slot], declined_features);
	if (failure != NULL)
		bad(slot, failure);
	virtio_mmio_queue_program(disk->base, &disk->vq);
	hostile_ignored_case("not-ready-notify", 0, true);
	hostile_ignored_case("bad-queue-notify", HOSTILE_NONEXISTENT_QUEUE, false);

	struct virtq_buffer read_data = { (uintptr_t)hostile_data, SECTOR, true };
	hostile_request_case("past-capacity", VIRTIO_BLK_T_IN, disk->capacity, &read_data, 1, false);
	hostile_request_case("unknown-type", HOSTILE_UNKNOWN_TYPE, 0, NULL, 0, false);
	struct virtq_buffer wrong_direction = { (uintptr_t)hostile_data, SECTOR, false };
	hostile_request_case("wrong-direction", VIRTIO_BLK_T_IN, 0, &wrong_direction, 1, false);

	puts("hostile: done\n");
	debug_exit(EXIT_OK);
}

/* ---- mode 3: bench ---- */

static void bench(int slot)
{
	struct vblk *disk = init_disk(slot);
	uint32_t depth = queue_depth(1);
	uint64_t request_bytes = params.request_bytes ? params.request_bytes : BENCH_DEFAULT_REQUEST_BYTES;
	uint64_t total_bytes = params.total_bytes ? params.total_bytes : BENCH_DEFAULT_TOTAL_BYTES;
	bool write = params.bench_op == BENCH_OP_WRITE;
	if (params.bench_op > BENCH_OP_WRITE)
		bad(slot, "bench op must be 0 (read) or 1 (write)");
	if (request_bytes % SECTOR != 0)
		bad(slot, "bench request bytes must be a multiple of 512");
	if (depth * request_bytes > BENCH_BUFFER_BYTES)
		bad(slot, "bench depth x request bytes must be at most 16 MiB");
	if (RT_FREE_RAM + depth * request_bytes > rt_ram_end())
		bad(slot, "not enough RAM for the bench buffers at 4 MiB");
	uint64_t request_sectors = request_bytes / SECTOR;
	if (request_sectors > disk->capacity)
		bad(slot, "bench requests are larger than the disk");
	uint64_t total_requests = (total_bytes + request_bytes - 1) / request_bytes;

	uint64_t submitted = 0, completed = 0, sector = 0;
	puts("bench start\n");
	for (;;) {
		/* Refill every idle slot, then one kick for all of them. */
		for (uint32_t j = 0; j < depth && submitted < total_requests; j++) {
			if (requests[j].in_flight)
				continue;
			if (sector + request_sectors > disk->capacity)
				sector = 0;
			struct virtq_buffer data = { RT_FREE_RAM + j * request_bytes, (uint32_t)request_bytes, !write };
			if (!vblk_submit(disk, &requests[j], write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, sector, &data, 1, false))
				bad(slot, "no room in the queue");
			sector += request_sectors;
			submitted++;
		}
		vblk_kick(disk);
		if (completed == total_requests)
			break;
		int result = vblk_wait_any(disk);
		if (result < 0)
			bad_result(slot, "bench", result);
		for (uint32_t j = 0; j < depth; j++) {
			if (!requests[j].done)
				continue;
			requests[j].done = false;
			if (requests[j].status != VIRTIO_BLK_S_OK)
				bad_result(slot, "bench request", requests[j].status);
			completed++;
		}
	}
	puts("bench done ");
	put_dec(completed);
	putc('\n');
	debug_exit(EXIT_OK);
}

int main(void)
{
	params = *(volatile struct disk_params *)RT_GUEST_PARAMS;
	declined_features = params.declined_features;
	int slot = first_block_slot(vblk_count_slots());
	if (slot < 0)
		no_device();
	switch (params.mode) {
	case MODE_CHECK:
		check(vblk_count_slots());
		break;
	case MODE_LOOP:
		loop(slot);
		break;
	case MODE_HOSTILE:
		hostile(slot);
		break;
	case MODE_BENCH:
		bench(slot);
		break;
	}
	puts("disk BAD: unknown mode ");
	put_dec(params.mode);
	putc('\n');
	return EXIT_BAD;
}
