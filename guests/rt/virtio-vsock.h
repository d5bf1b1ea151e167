/*
 * virtio-vsock.h - a polled virtio-vsock driver (virtio 1.2 section 5.10) over virtio-mmio:
 * stream connections only, credit-based flow control both ways, no interrupts.
 *
 * Use: vsock_init() the device, vsock_listen() on ports and/or vsock_connect(), then call
 * vsock_poll() in a loop; between polls, move bytes with vsock_read()/vsock_write() on the
 * connections in VSOCK_ESTABLISHED, and vsock_close() them. A connection that the peer reset, or
 * that a transport reset (after the VMM restored a snapshot) dropped, goes to VSOCK_CLOSED and
 * keeps its slot until the application gives it back with vsock_release().
 */
#ifndef RT_VIRTIO_VSOCK_H
#define RT_VIRTIO_VSOCK_H

#include "virtio.h"

#define VIRTIO_ID_VSOCK 19
#define VSOCK_HOST_CID 2

#define VSOCK_OP_REQUEST 1
#define VSOCK_OP_RESPONSE 2
#define VSOCK_OP_RST 3
#define VSOCK_OP_SHUTDOWN 4
#define VSOCK_OP_RW 5
#define VSOCK_OP_CREDIT_UPDATE 6
#define VSOCK_OP_CREDIT_REQUEST 7
#define VSOCK_SHUTDOWN_RCV 1
#define VSOCK_SHUTDOWN_SEND 2
#define VSOCK_TYPE_STREAM 1
#define VSOCK_EVENT_TRANSPORT_RESET 0

/* Sizes of this driver: connections at once, receive buffer per connection (what it advertises
 * as buf_alloc), RX buffers and TX slots (each a header and up to VSOCK_PACKET_BYTES). */
#define VSOCK_MAX_CONNECTIONS 16
#define VSOCK_CONN_BUFFER 65536
#define VSOCK_RX_BUFFERS 32
#define VSOCK_TX_SLOTS 16
#define VSOCK_PACKET_BYTES 4096
#define VSOCK_MAX_LISTEN 4

struct virtio_vsock_hdr {
	uint64_t src_cid;
	uint64_t dst_cid;
	uint32_t src_port;
	uint32_t dst_port;
	uint32_t len;
	uint16_t type;
	uint16_t op;
	uint32_t flags;
	uint32_t buf_alloc;
	uint32_t fwd_cnt;
} __attribute__((packed));

enum vsock_state { VSOCK_FREE, VSOCK_CONNECTING, VSOCK_ESTABLISHED, VSOCK_CLOSING, VSOCK_CLOSED };

struct vsock_conn {
	enum vsock_state state;
	uint32_t local_port;
	uint32_t peer_port;
	/* The peer's credit (its buf_alloc and fwd_cnt) and what we sent it. */
	uint32_t peer_buf_alloc;
	uint32_t peer_fwd_cnt;
	uint32_t tx_cnt;
	/* Bytes read by the application (our fwd_cnt), and the fwd_cnt last told to the peer. */
	uint32_t fwd_cnt;
	uint32_t advertised_fwd;
	/* SHUTDOWN flags the peer sent. */
	uint32_t peer_shutdown;
	/* Why it closed: true when the peer reset it (RST) rather than a transport reset. */
	bool reset_by_peer;
	/* Received bytes not yet read: a ring of VSOCK_CONN_BUFFER. */
	uint32_t rx_head;
	uint32_t rx_len;
	uint8_t rx[VSOCK_CONN_BUFFER];
};

struct vsock_rings {
	struct virtq_memory rx, tx, event;
};

struct vsock_tx_slot {
	struct virtio_vsock_hdr header;
	uint8_t data[VSOCK_PACKET_BYTES];
	bool busy;
};

struct vsock_dev {
	uintptr_t base;
	uint64_t features;
	uint64_t guest_cid;
	struct virtq rx, tx, event;
	struct vsock_rings *rings;
	uint32_t listen[VSOCK_MAX_LISTEN];
	int listen_count;
	uint32_t next_port;
	/* Transport resets seen (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET). */
	uint32_t transport_resets;
	/* Packets dropped: for no connection, past our credit, or malformed. */
	uint32_t dropped;
	struct vsock_conn conns[VSOCK_MAX_CONNECTIONS];
	uint8_t rx_buffers[VSOCK_RX_BUFFERS][sizeof(struct virtio_vsock_hdr) + VSOCK_PACKET_BYTES];
	uint32_t event_buffer;
	struct vsock_tx_slot tx_slots[VSOCK_TX_SLOTS];
};

/* The base of the first virtio-mmio slot (of 8 from 0xd0000000) holding a vsock device, or 0. */
uintptr_t vsock_find(void);
/* Resets the device at `base` and sets it up: VERSION_1 (and EVENT_IDX when offered), the three
 * queues, RX and EVENT buffers, DRIVER_OK; reads guest_cid. Returns NULL, or what went wrong. */
const char *vsock_init(struct vsock_dev *dev, uintptr_t base, struct vsock_rings *rings);
void vsock_listen(struct vsock_dev *dev, uint32_t port);
/* Sends a REQUEST to (cid 2, port); the connection is VSOCK_CONNECTING until the host answers
 * (VSOCK_ESTABLISHED) or refuses (VSOCK_CLOSED). NULL when no slot or TX room is free. */
struct vsock_conn *vsock_connect(struct vsock_dev *dev, uint32_t port);
/* Takes what the device delivered: packets, the transport-reset event. Returns how many. */
int vsock_poll(struct vsock_dev *dev);
/* Bytes received and not yet read; bytes the peer can take now (its credit). */
uint32_t vsock_readable(const struct vsock_conn *conn);
uint32_t vsock_writable(const struct vsock_conn *conn);
/* Reads up to `n` bytes (the peer learns the room it frees). Returns how many. */
uint32_t vsock_read(struct vsock_dev *dev, struct vsock_conn *conn, void *buffer, uint32_t n);
/* Sends up to `n` bytes, as the credit and TX room allow. Returns how many. */
uint32_t vsock_write(struct vsock_dev *dev, struct vsock_conn *conn, const void *data, uint32_t n);
/* Closes both ways (SHUTDOWN with both flags); VSOCK_CLOSED when the host's RST comes. */
void vsock_close(struct vsock_dev *dev, struct vsock_conn *conn);
/* Gives a VSOCK_CLOSED connection's slot back for new connections. */
void vsock_release(struct vsock_conn *conn);

#endif
