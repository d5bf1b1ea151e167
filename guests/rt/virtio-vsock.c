/*
 * virtio-vsock.c - the polled virtio-vsock driver (see virtio-vsock.h).
 */
#include "virtio-vsock.h"

#define RX_QUEUE 0
#define TX_QUEUE 1
#define EVENT_QUEUE 2
#define RESET_SPINS (100 * RT_SPINS_PER_MS)
/* Polls of the TX used ring while waiting for a free slot. */
#define TX_WAIT_SPINS (100 * RT_SPINS_PER_MS)
#define FIRST_LOCAL_PORT 49152
#define HEADER_BYTES ((uint32_t)sizeof(struct virtio_vsock_hdr))

uintptr_t vsock_find(void)
{
	for (uintptr_t slot = 0; slot < 8; slot++) {
		uintptr_t base = 0xd0000000UL + slot * 0x1000UL;
		if (!virtio_mmio_present(base))
			return 0;
		if (virtio_mmio_read(base, VIRTIO_MMIO_DEVICE_ID) == VIRTIO_ID_VSOCK)
			return base;
	}
	return 0;
}

static void post_rx(struct vsock_dev *dev, uint32_t index)
{
	struct virtq_buffer buffer = { (uintptr_t)dev->rx_buffers[index], sizeof(dev->rx_buffers[index]), true };
	virtq_add(&dev->rx, &buffer, 1, &dev->rx_buffers[index]);
}

static void post_event(struct vsock_dev *dev)
{
	struct virtq_buffer buffer = { (uintptr_t)&dev->event_buffer, sizeof(dev->event_buffer), true };
	dev->event_buffer = 0xffffffffu;
	virtq_add(&dev->event, &buffer, 1, &dev->event_buffer);
}

static const char *setup_queue(struct vsock_dev *dev, struct virtq *vq, uint16_t index, struct virtq_memory *memory)
{
	uint16_t size = virtq_pick_size(virtio_mmio_queue_max(dev->base, index));
	if (size < VSOCK_RX_BUFFERS)
		return "a queue smaller than the driver's buffers";
	virtq_init(vq, index, memory, size, (dev->features & VIRTIO_FEATURE(VIRTIO_F_RING_EVENT_IDX)) != 0);
	virtio_mmio_queue_program(dev->base, vq);
	virtio_mmio_queue_enable(dev->base, index);
	if (!virtio_mmio_queue_ready(dev->base, index))
		return "a queue did not become ready";
	return NULL;
}

const char *vsock_init(struct vsock_dev *dev, uintptr_t base, struct vsock_rings *rings)
{
	memset(dev, 0, sizeof(*dev));
	dev->base = base;
	dev->rings = rings;
	dev->next_port = FIRST_LOCAL_PORT;
	if (virtio_mmio_read(base, VIRTIO_MMIO_DEVICE_ID) != VIRTIO_ID_VSOCK)
		return "not a vsock device";
	if (!virtio_mmio_reset(base, RESET_SPINS))
		return "Status did not read 0 after a reset";
	uint64_t supported = VIRTIO_FEATURE(VIRTIO_F_VERSION_1) | VIRTIO_FEATURE(VIRTIO_F_RING_EVENT_IDX) | VIRTIO_FEATURE(0);
	const char *failure = virtio_mmio_negotiate(base, supported, &dev->features);
	if (failure == NULL)
		failure = setup_queue(dev, &dev->rx, RX_QUEUE, &rings->rx);
	if (failure == NULL)
		failure = setup_queue(dev, &dev->tx, TX_QUEUE, &rings->tx);
	if (failure == NULL)
		failure = setup_queue(dev, &dev->event, EVENT_QUEUE, &rings->event);
	if (failure != NULL) {
		virtio_mmio_add_status(base, VIRTIO_STATUS_FAILED);
		return failure;
	}
	dev->guest_cid = (uint64_t)virtio_mmio_read(base, VIRTIO_MMIO_CONFIG + 4) << 32 | virtio_mmio_read(base, VIRTIO_MMIO_CONFIG);
	virtio_mmio_add_status(base, VIRTIO_STATUS_DRIVER_OK);
	for (uint32_t i = 0; i < VSOCK_RX_BUFFERS; i++)
		post_rx(dev, i);
	post_event(dev);
	virtq_kick(base, &dev->rx);
	virtq_kick(base, &dev->event);
	return NULL;
}

void vsock_listen(struct vsock_dev *dev, uint32_t port)
{
	if (dev->listen_count < VSOCK_MAX_LISTEN)
		dev->listen[dev->listen_count++] = port;
}

static void reclaim_tx(struct vsock_dev *dev)
{
	uint32_t len;
	struct vsock_tx_slot *slot;
	while ((slot = virtq_get_used(&dev->tx, &len)) != NULL)
		slot->busy = false;
}

/* Publishes the packets queued since the last flush, notifying the device where it wants to be. */
static void flush_tx(struct vsock_dev *dev)
{
	virtq_kick(dev->base, &dev->tx);
}

static struct vsock_tx_slot *free_slot(struct vsock_dev *dev)
{
	for (unsigned long spin = 0; spin < TX_WAIT_SPINS; spin++) {
		if (spin == 1)
			flush_tx(dev); /* none free: let the device take what waits */
		reclaim_tx(dev);
		for (int i = 0; i < VSOCK_TX_SLOTS; i++) {
			if (!dev->tx_slots[i].busy)
				return &dev->tx_slots[i];
		}
		cpu_relax();
	}
	return NULL;
}

/* One packet from (our cid, local) to (host, peer); `conn` (may be NULL) supplies the credit. */
static bool send_packet(struct vsock_dev *dev, struct vsock_conn *conn, uint32_t local, uint32_t peer, uint16_t op, uint32_t flags, const void *data, uint32_t len)
{
	struct vsock_tx_slot *slot = free_slot(dev);
	if (slot == NULL)
		return false;
	struct virtio_vsock_hdr *h = &slot->header;
	h->src_cid = dev->guest_cid;
	h->dst_cid = VSOCK_HOST_CID;
	h->src_port = local;
	h->dst_port = peer;
	h->len = len;
	h->type = VSOCK_TYPE_STREAM;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = conn != NULL ? VSOCK_CONN_BUFFER : 0;
	h->fwd_cnt = conn != NULL ? conn->fwd_cnt : 0;
	if (conn != NULL)
		conn->advertised_fwd = conn->fwd_cnt;
	if (len > 0)
		memcpy(slot->data, data, len);
	struct virtq_buffer buffer = { (uintptr_t)slot, HEADER_BYTES + len, false };
	if (virtq_add(&dev->tx, &buffer, 1, slot) < 0)
		return false;
	slot->busy = true;
	/* Published by flush_tx() at the end of the call that queued it: one notify for a burst. */
	return true;
}

static struct vsock_conn *find(struct vsock_dev *dev, uint32_t local, uint32_t peer)
{
	for (int i = 0; i < VSOCK_MAX_CONNECTIONS; i++) {
		struct vsock_conn *conn = &dev->conns[i];
		if (conn->state != VSOCK_FREE && conn->state != VSOCK_CLOSED && conn->local_port == local && conn->peer_port == peer)
			return conn;
	}
	return NULL;
}

static struct vsock_conn *new_conn(struct vsock_dev *dev, uint32_t local, uint32_t peer)
{
	for (int i = 0; i < VSOCK_MAX_CONNECTIONS; i++) {
		struct vsock_conn *conn = &dev->conns[i];
		if (conn->state == VSOCK_FREE) {
			memset(conn, 0, offsetof(struct vsock_conn, rx));
			conn->local_port = local;
			conn->peer_port = peer;
			return conn;
		}
	}
	return NULL;
}

static bool listening(const struct vsock_dev *dev, uint32_t port)
{
	for (int i = 0; i < dev->listen_count; i++) {
		if (dev->listen[i] == port)
			return true;
	}
	return false;
}

struct vsock_conn *vsock_connect(struct vsock_dev *dev, uint32_t port)
{
	uint32_t local = dev->next_port++;
	struct vsock_conn *conn = new_conn(dev, local, port);
	if (conn == NULL)
		return NULL;
	if (!send_packet(dev, conn, local, port, VSOCK_OP_REQUEST, 0, NULL, 0))
		return NULL;
	flush_tx(dev);
	conn->state = VSOCK_CONNECTING;
	return conn;
}

static void receive(struct vsock_dev *dev, const struct virtio_vsock_hdr *h, const uint8_t *payload, uint32_t len)
{
	if (h->dst_cid != dev->guest_cid || h->src_cid != VSOCK_HOST_CID || h->type != VSOCK_TYPE_STREAM || h->len != len) {
		dev->dropped++;
		return;
	}
	struct vsock_conn *conn = find(dev, h->dst_port, h->src_port);
	if (conn == NULL) {
		if (h->op == VSOCK_OP_REQUEST && listening(dev, h->dst_port) && (conn = new_conn(dev, h->dst_port, h->src_port)) != NULL) {
			conn->peer_buf_alloc = h->buf_alloc;
			conn->peer_fwd_cnt = h->fwd_cnt;
			if (send_packet(dev, conn, conn->local_port, conn->peer_port, VSOCK_OP_RESPONSE, 0, NULL, 0))
				conn->state = VSOCK_ESTABLISHED;
			return;
		}
		if (h->op != VSOCK_OP_RST)
			send_packet(dev, NULL, h->dst_port, h->src_port, VSOCK_OP_RST, 0, NULL, 0);
		return;
	}
	conn->peer_buf_alloc = h->buf_alloc;
	conn->peer_fwd_cnt = h->fwd_cnt;
	switch (h->op) {
	case VSOCK_OP_RESPONSE:
		if (conn->state == VSOCK_CONNECTING)
			conn->state = VSOCK_ESTABLISHED;
		break;
	case VSOCK_OP_RW:
		if (conn->state != VSOCK_ESTABLISHED || len > VSOCK_CONN_BUFFER - conn->rx_len) {
			dev->dropped++;
			break;
		}
		{
			uint32_t tail = (conn->rx_head + conn->rx_len) % VSOCK_CONN_BUFFER, first = VSOCK_CONN_BUFFER - tail;
			if (first > len)
				first = len;
			memcpy(&conn->rx[tail], payload, first);
			memcpy(conn->rx, payload + first, len - first);
		}
		conn->rx_len += len;
		break;
	case VSOCK_OP_SHUTDOWN:
		conn->peer_shutdown |= h->flags;
		break;
	case VSOCK_OP_RST:
		conn->reset_by_peer = true;
		conn->state = VSOCK_CLOSED;
		break;
	case VSOCK_OP_CREDIT_REQUEST:
		send_packet(dev, conn, conn->local_port, conn->peer_port, VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
		break;
	default:
		break;
	}
}

int vsock_poll(struct vsock_dev *dev)
{
	int count = 0;
	uint32_t len;
	/* The RX packets to take this time, seen before the events: a transport reset the device
	 * sent before one of them is then handled first, so a new connection never meets one that
	 * the reset ended. */
	uint16_t rx_end = dev->rx.used->idx;
	compiler_barrier();
	while (virtq_get_used(&dev->event, &len) != NULL) {
		if (len >= 4 && dev->event_buffer == VSOCK_EVENT_TRANSPORT_RESET) {
			/* Every connection is gone (5.10.6.7); listeners stay. */
			dev->transport_resets++;
			for (int i = 0; i < VSOCK_MAX_CONNECTIONS; i++) {
				if (dev->conns[i].state != VSOCK_FREE)
					dev->conns[i].state = VSOCK_CLOSED;
			}
		}
		post_event(dev);
		virtq_kick(dev->base, &dev->event);
		count++;
	}
	uint8_t *buffer;
	int received = 0;
	while (dev->rx.last_used != rx_end && (buffer = virtq_get_used(&dev->rx, &len)) != NULL) {
		if (len >= HEADER_BYTES && len <= sizeof(dev->rx_buffers[0]))
			receive(dev, (const struct virtio_vsock_hdr *)buffer, buffer + HEADER_BYTES, len - HEADER_BYTES);
		else
			dev->dropped++;
		post_rx(dev, (uint32_t)((buffer - dev->rx_buffers[0]) / sizeof(dev->rx_buffers[0])));
		received++;
	}
	if (received > 0)
		virtq_kick(dev->base, &dev->rx);
	/* Answers to what came in (RESPONSE, RST, CREDIT_UPDATE). */
	flush_tx(dev);
	reclaim_tx(dev);
	return count + received;
}

uint32_t vsock_readable(const struct vsock_conn *conn)
{
	return conn->rx_len;
}

uint32_t vsock_writable(const struct vsock_conn *conn)
{
	if (conn->state != VSOCK_ESTABLISHED || conn->peer_shutdown & VSOCK_SHUTDOWN_RCV)
		return 0;
	uint32_t in_flight = conn->tx_cnt - conn->peer_fwd_cnt;
	return in_flight >= conn->peer_buf_alloc ? 0 : conn->peer_buf_alloc - in_flight;
}

uint32_t vsock_read(struct vsock_dev *dev, struct vsock_conn *conn, void *buffer, uint32_t n)
{
	if (n > conn->rx_len)
		n = conn->rx_len;
	uint8_t *out = buffer;
	uint32_t first = VSOCK_CONN_BUFFER - conn->rx_head;
	if (first > n)
		first = n;
	memcpy(out, &conn->rx[conn->rx_head], first);
	memcpy(out + first, conn->rx, n - first);
	conn->rx_head = (conn->rx_head + n) % VSOCK_CONN_BUFFER;
	conn->rx_len -= n;
	conn->fwd_cnt += n;
	/* Tell the peer once it may be down to half its credit (a reply would carry it too). */
	if (conn->state == VSOCK_ESTABLISHED && conn->fwd_cnt - conn->advertised_fwd >= VSOCK_CONN_BUFFER / 2) {
		send_packet(dev, conn, conn->local_port, conn->peer_port, VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
		flush_tx(dev);
	}
	return n;
}

uint32_t vsock_write(struct vsock_dev *dev, struct vsock_conn *conn, const void *data, uint32_t n)
{
	const uint8_t *bytes = data;
	uint32_t done = 0;
	while (done < n) {
		uint32_t chunk = n - done, room = vsock_writable(conn);
		if (chunk > room)
			chunk = room;
		if (chunk > VSOCK_PACKET_BYTES)
			chunk = VSOCK_PACKET_BYTES;
		if (chunk == 0 || !send_packet(dev, conn, conn->local_port, conn->peer_port, VSOCK_OP_RW, 0, bytes + done, chunk))
			break;
		conn->tx_cnt += chunk;
		done += chunk;
	}
	flush_tx(dev);
	return done;
}

void vsock_release(struct vsock_conn *conn)
{
	if (conn->state == VSOCK_CLOSED)
		conn->state = VSOCK_FREE;
}

void vsock_close(struct vsock_dev *dev, struct vsock_conn *conn)
{
	if (conn->state != VSOCK_ESTABLISHED && conn->state != VSOCK_CONNECTING)
		return;
	send_packet(dev, conn, conn->local_port, conn->peer_port, VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_RCV | VSOCK_SHUTDOWN_SEND, NULL, 0);
	flush_tx(dev);
	conn->state = VSOCK_CLOSING;
}
