/*
 * vsock-echo.c - a virtio-vsock echo server for the VMM's vsock device. Runs at CPL 3 on the
 * runtime in guests/rt/ (rt.h), polling (no interrupts).
 *
 * Contract with the host:
 *   - The first virtio-mmio slot (0xd0000000 + i * 0x1000) whose DeviceID is 19.
 *   - At start, connects to host port 5001 (CID 2), writes "hello from the guest\n" and closes;
 *     prints "vsock-echo: hello sent" once the host accepted, "vsock-echo: hello refused" when it
 *     reset the connection.
 *   - Listens on port 5000; every byte a connection brings is written back on it (up to 16
 *     connections at once; 64 KiB of credit each). When the host closes its sending side, the guest closes the
 *     connection after echoing what it had.
 *   - Output on COM1: "vsock-echo: ready, cid <cid>, port 5000" once listening (before the hello's
 *     answer), "vsock-echo: transport reset" for each VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
 *   - Never exits on its own; "vsock-echo: <what> BAD" and exit 0x7f when the device cannot be
 *     set up, 0x7e when there is none.
 *   - Parameters at guest-physical 0x5000 (all zero = defaults): u32 hostile. When 1, before
 *     anything else, it puts two broken packets on TX, one at a time: a 20-byte buffer (shorter
 *     than the header) and a header whose len is larger than its buffer. For each it prints
 *     "vsock-echo: hostile <case>: needs-reset" once Status has DEVICE_NEEDS_RESET (or
 *     "... : ignored" after about 2 s without), and sets the device up again.
 */
#include "rt/rt.h"
#include "rt/virtio-vsock.h"

#define ECHO_PORT 5000
#define HELLO_PORT 5001

static struct vsock_rings rings;
static struct vsock_dev dev;
static uint8_t chunk[VSOCK_CONN_BUFFER];
static const char hello[] = "hello from the guest\n";

static void echo(struct vsock_conn *conn)
{
	for (;;) {
		uint32_t n = vsock_readable(conn), room = vsock_writable(conn);
		if (n > room)
			n = room;
		if (n == 0)
			break;
		n = vsock_read(&dev, conn, chunk, n);
		if (vsock_write(&dev, conn, chunk, n) < n) {
			/* No TX slot came free in time; the host lost bytes of this connection. */
			puts("vsock-echo: tx stalled, closing a connection\n");
			vsock_close(&dev, conn);
			return;
		}
	}
	if (conn->peer_shutdown & VSOCK_SHUTDOWN_SEND && vsock_readable(conn) == 0)
		vsock_close(&dev, conn);
}

#define HOSTILE_SPINS (2000 * RT_SPINS_PER_MS)

/* One broken TX packet of `bytes` bytes whose header says `len`; then whether the device gave up. */
static void hostile(uintptr_t base, const char *name, uint32_t bytes, uint32_t len)
{
	struct vsock_tx_slot *slot = &dev.tx_slots[0];
	memset(&slot->header, 0, sizeof(slot->header));
	slot->header.src_cid = dev.guest_cid;
	slot->header.dst_cid = VSOCK_HOST_CID;
	slot->header.type = VSOCK_TYPE_STREAM;
	slot->header.op = VSOCK_OP_RW;
	slot->header.len = len;
	struct virtq_buffer buffer = { (uintptr_t)slot, bytes, false };
	virtq_add(&dev.tx, &buffer, 1, slot);
	virtq_kick(base, &dev.tx);
	const char *outcome = "ignored";
	for (unsigned long spin = 0; spin < HOSTILE_SPINS; spin++) {
		if (virtio_mmio_status(base) & VIRTIO_STATUS_DEVICE_NEEDS_RESET) {
			outcome = "needs-reset";
			break;
		}
		cpu_relax();
	}
	puts("vsock-echo: hostile ");
	puts(name);
	puts(": ");
	puts(outcome);
	puts("\n");
}

int main(void)
{
	uint32_t hostile_mode = *(volatile uint32_t *)RT_GUEST_PARAMS;
	uintptr_t base = vsock_find();
	if (base == 0) {
		puts("vsock-echo: no virtio-vsock device found\n");
		return 0x7e;
	}
	const char *failure = vsock_init(&dev, base, &rings);
	if (failure != NULL) {
		puts("vsock-echo: ");
		puts(failure);
		puts(" BAD\n");
		return 0x7f;
	}
	if (hostile_mode == 1) {
		hostile(base, "short-header", 20, 0);
		failure = vsock_init(&dev, base, &rings);
		if (failure == NULL) {
			hostile(base, "len-past-buffer", sizeof(struct virtio_vsock_hdr) + 8, 4096);
			failure = vsock_init(&dev, base, &rings);
		}
		if (failure != NULL) {
			puts("vsock-echo: ");
			puts(failure);
			puts(" BAD\n");
			return 0x7f;
		}
	}
	vsock_listen(&dev, ECHO_PORT);
	struct vsock_conn *greeting = vsock_connect(&dev, HELLO_PORT);
	puts("vsock-echo: ready, cid ");
	put_dec(dev.guest_cid);
	puts(", port 5000\n");
	uint32_t resets = 0;
	for (;;) {
		vsock_poll(&dev);
		if (greeting != NULL && greeting->state != VSOCK_CONNECTING) {
			if (greeting->state == VSOCK_ESTABLISHED && vsock_write(&dev, greeting, hello, sizeof(hello) - 1) == sizeof(hello) - 1) {
				puts("vsock-echo: hello sent\n");
				vsock_close(&dev, greeting);
			} else {
				puts("vsock-echo: hello refused\n");
			}
			greeting = NULL;
		}
		for (int i = 0; i < VSOCK_MAX_CONNECTIONS; i++) {
			struct vsock_conn *conn = &dev.conns[i];
			if (conn->state == VSOCK_ESTABLISHED && conn->local_port == ECHO_PORT)
				echo(conn);
			else if (conn != greeting)
				vsock_release(conn);
		}
		if (dev.transport_resets != resets) {
			resets = dev.transport_resets;
			puts("vsock-echo: transport reset\n");
		}
		cpu_relax();
	}
}
