/*
 * rng.c - a virtio-rng client: takes random bytes from the VMM's entropy device and checks that
 * a hostile request is refused. Runs at CPL 3 on the runtime in guests/rt/ (rt.h).
 *
 * Run: node-kvm run guests/build/rng.elf --rng (needs --rng).
 *
 * Contract with the host:
 *   - Devices: virtio-mmio at 0xd0000000 + i * 0x1000, i = 0..7; the scan ends at the first slot
 *     whose MagicValue is not "virt". The first slot whose DeviceID is 4 (entropy) is used; the
 *     driver accepts VIRTIO_F_VERSION_1 only and polls queue 0's used ring (no interrupts).
 *   - Output on COM1, one line each:
 *       rng: slot <i>
 *       rng: <32 hex digits>          twice: 16 bytes from two 4 KiB requests (one buffer
 *                                     each, at 0x600000 and 0x601000 in guest RAM, which the
 *                                     guest itself never writes before)
 *       rng: filled 4096 4096         the bytes the device said it wrote for each
 *       rng: hostile: needs-reset     a request with a device-readable buffer
 *       rng: recovered <32 hex digits>  after a reset and a new request
 *   - A u32 at guest-physical 0x5000 (GUEST_PARAMS_ADDR; zero unless the host wrote it before
 *     boot): when not zero, the guest prints "rng: holding" before it exits and waits until the
 *     host writes it zero, so that the host can look at its RAM.
 *     Exit through isa-debug-exit: 0x10 on success; 0x7f after "rng BAD: <what>"; 0x7e after
 *     "rng: no virtio-rng device found".
 */
#include "rt/rt.h"
#include "rt/virtio.h"

#define VIRTIO_ID_ENTROPY 4
#define SLOTS 8
#define BUFFER_A 0x600000UL
#define BUFFER_B 0x601000UL
#define REQUEST_BYTES 4096
#define TIMEOUT_SPINS (2000UL * RT_SPINS_PER_MS)

static struct virtq_memory ring_memory;
static struct virtq vq;

static __attribute__((noreturn)) void bad(const char *what)
{
	puts("rng BAD: ");
	puts(what);
	putc('\n');
	debug_exit(0x7f);
}

static void put_bytes(const volatile uint8_t *bytes)
{
	static const char digits[] = "0123456789abcdef";
	for (int i = 0; i < 16; i++) {
		putc(digits[bytes[i] >> 4]);
		putc(digits[bytes[i] & 15]);
	}
}

static void init(uintptr_t base)
{
	uint64_t features;
	if (!virtio_mmio_reset(base, TIMEOUT_SPINS))
		bad("Status did not read 0 after a reset");
	const char *failure = virtio_mmio_negotiate(base, VIRTIO_FEATURE(VIRTIO_F_VERSION_1), &features);
	if (failure != NULL)
		bad(failure);
	uint16_t size = virtq_pick_size(virtio_mmio_queue_max(base, 0));
	if (size == 0)
		bad("queue 0 does not exist");
	virtq_init(&vq, 0, &ring_memory, size, false);
	virtio_mmio_queue_program(base, &vq);
	virtio_mmio_queue_enable(base, 0);
	virtio_mmio_add_status(base, VIRTIO_STATUS_DRIVER_OK);
}

/* Queues one request of `buffer`, as the device should write it or (hostile) read it. */
static void request(uintptr_t base, uintptr_t buffer, bool device_writes)
{
	struct virtq_buffer one = { .addr = buffer, .len = REQUEST_BYTES, .device_writes = device_writes };
	if (virtq_add(&vq, &one, 1, (void *)buffer) < 0)
		bad("no free descriptor");
	virtq_kick(base, &vq);
}

static uint32_t wait_used(uintptr_t buffer)
{
	uint32_t len = 0;
	for (unsigned long spin = 0; spin < TIMEOUT_SPINS; spin++) {
		void *cookie = virtq_get_used(&vq, &len);
		if (cookie != NULL) {
			if ((uintptr_t)cookie != buffer)
				bad("a used buffer that was not the one asked for");
			return len;
		}
		cpu_relax();
	}
	bad("timeout waiting for random bytes");
}

int main(void)
{
	uintptr_t base = 0;
	int slot;
	for (slot = 0; slot < SLOTS; slot++) {
		uintptr_t at = 0xd0000000UL + (uintptr_t)slot * 0x1000;
		if (!virtio_mmio_present(at))
			break;
		if (virtio_mmio_read(at, VIRTIO_MMIO_DEVICE_ID) == VIRTIO_ID_ENTROPY) {
			base = at;
			break;
		}
	}
	if (base == 0) {
		puts("rng: no virtio-rng device found\n");
		debug_exit(0x7e);
	}
	puts("rng: slot ");
	put_dec((uint64_t)slot);
	putc('\n');

	init(base);
	/* Not cleared first: RAM starts zero, and the host checks that only the device wrote them. */
	request(base, BUFFER_A, true);
	uint32_t filled_a = wait_used(BUFFER_A);
	request(base, BUFFER_B, true);
	uint32_t filled_b = wait_used(BUFFER_B);
	for (uintptr_t buffer = BUFFER_A; buffer <= BUFFER_B; buffer += REQUEST_BYTES) {
		puts("rng: ");
		put_bytes((const volatile uint8_t *)buffer);
		putc('\n');
	}
	puts("rng: filled ");
	put_dec(filled_a);
	putc(' ');
	put_dec(filled_b);
	putc('\n');

	/* A buffer the device could only read: the device must give up on the queue. */
	request(base, BUFFER_A, false);
	unsigned long spin;
	for (spin = 0; spin < TIMEOUT_SPINS; spin++) {
		if (virtio_mmio_status(base) & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
			break;
		cpu_relax();
	}
	puts(spin < TIMEOUT_SPINS ? "rng: hostile: needs-reset\n" : "rng: hostile: timeout\n");

	init(base);
	memset((void *)BUFFER_A, 0, REQUEST_BYTES);
	request(base, BUFFER_A, true);
	wait_used(BUFFER_A);
	puts("rng: recovered ");
	put_bytes((const volatile uint8_t *)BUFFER_A);
	putc('\n');
	volatile uint32_t *hold = (volatile uint32_t *)0x5000;
	if (*hold != 0) {
		puts("rng: holding\n");
		while (*hold != 0)
			cpu_relax();
	}
	return 0x10;
}
