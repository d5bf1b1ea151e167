/*
 * virtio-net.c - the polled virtio-net driver (see virtio-net.h).
 */
#include "virtio-net.h"

#define RECEIVE_QUEUE 0
#define TRANSMIT_QUEUE 1
#define RESET_SPINS (100 * RT_SPINS_PER_MS)

uintptr_t vnet_find(void)
{
	for (int slot = 0; slot < VNET_MMIO_SLOTS; slot++) {
		uintptr_t base = VNET_MMIO_BASE + (uintptr_t)slot * VNET_MMIO_STRIDE;
		if (!virtio_mmio_present(base))
			break;
		if (virtio_mmio_read(base, VIRTIO_MMIO_DEVICE_ID) == VIRTIO_ID_NET)
			return base;
	}
	return 0;
}

static const char *setup_queue(struct vnet *net, struct virtq *vq, uint16_t index, struct virtq_memory *memory)
{
	if (virtio_mmio_queue_ready(net->base, index))
		return "a queue is ready right after a reset";
	uint16_t size = virtq_pick_size(virtio_mmio_queue_max(net->base, index));
	if (size == 0)
		return "a queue does not exist (QueueNumMax 0)";
	if (size > VNET_QUEUE_SIZE)
		size = VNET_QUEUE_SIZE;
	virtq_init(vq, index, memory, size, false);
	virtio_mmio_queue_program(net->base, vq);
	virtio_mmio_queue_enable(net->base, index);
	if (!virtio_mmio_queue_ready(net->base, index))
		return "a queue did not become ready";
	return NULL;
}

static void post_receive_buffer(struct vnet *net, struct vnet_buffer *buffer)
{
	struct virtq_buffer b = { (uintptr_t)buffer->bytes, VNET_BUFFER_BYTES, true };
	virtq_add(&net->rx, &b, 1, buffer);
}

const char *vnet_init(struct vnet *net, uintptr_t base)
{
	net->base = base;
	if (virtio_mmio_read(base, VIRTIO_MMIO_VERSION) != VIRTIO_MMIO_MODERN_VERSION)
		return "not a version 2 (virtio 1.x) virtio-mmio device";
	if (virtio_mmio_read(base, VIRTIO_MMIO_DEVICE_ID) != VIRTIO_ID_NET)
		return "not a network device";
	if (!virtio_mmio_reset(base, RESET_SPINS))
		return "Status did not read 0 after a reset";
	const char *failure = virtio_mmio_negotiate(base, VNET_SUPPORTED_FEATURES, &net->features);
	if (failure == NULL)
		failure = setup_queue(net, &net->rx, RECEIVE_QUEUE, &net->rx_memory);
	if (failure == NULL)
		failure = setup_queue(net, &net->tx, TRANSMIT_QUEUE, &net->tx_memory);
	if (failure != NULL) {
		virtio_mmio_add_status(base, VIRTIO_STATUS_FAILED);
		return failure;
	}
	for (int i = 0; i < VNET_RX_BUFFERS; i++)
		post_receive_buffer(net, &net->rx_buffers[i]);
	net->rx_unposted = 0;
	net->tx_free_count = VNET_TX_BUFFERS;
	for (int i = 0; i < VNET_TX_BUFFERS; i++)
		net->tx_free[i] = &net->tx_buffers[i];
	virtio_mmio_add_status(base, VIRTIO_STATUS_DRIVER_OK);
	uint32_t status = virtio_mmio_status(base);
	if (status & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
		return "the device needs a reset right after DRIVER_OK";
	if (!(status & VIRTIO_STATUS_DRIVER_OK))
		return "DRIVER_OK did not stick";
	virtq_kick(base, &net->rx);
	if (!(net->features & VIRTIO_FEATURE(VIRTIO_NET_F_MAC)))
		return "the device has no MAC address (VIRTIO_NET_F_MAC)";
	/* 4.2.2.2: byte-wide reads of byte fields. */
	for (int i = 0; i < 6; i++)
		net->mac[i] = mmio_read8(base + VIRTIO_MMIO_CONFIG + VIRTIO_NET_CONFIG_MAC + i);
	net->status = (net->features & VIRTIO_FEATURE(VIRTIO_NET_F_STATUS))
		? (uint16_t)(virtio_mmio_read(base, VIRTIO_MMIO_CONFIG + 4) >> 16) : VIRTIO_NET_S_LINK_UP;
	return NULL;
}

uint8_t *vnet_receive(struct vnet *net, uint32_t *len)
{
	uint32_t used;
	struct vnet_buffer *buffer;
	while ((buffer = virtq_get_used(&net->rx, &used)) != NULL) {
		if (used < VNET_HDR_BYTES + 14 || used > VNET_BUFFER_BYTES) {
			net->rx_runts++;
			post_receive_buffer(net, buffer);
			virtq_kick(net->base, &net->rx);
			continue;
		}
		*len = used - VNET_HDR_BYTES;
		return buffer->bytes + VNET_HDR_BYTES;
	}
	return NULL;
}

void vnet_receive_done(struct vnet *net, uint8_t *frame)
{
	post_receive_buffer(net, (struct vnet_buffer *)(frame - VNET_HDR_BYTES));
	/* One notify for a few buffers, as long as the device still has some. */
	if (++net->rx_unposted >= VNET_RX_BUFFERS / 4 || net->rx.free_count + VNET_RX_BUFFERS / 2 > net->rx.size) {
		virtq_kick(net->base, &net->rx);
		net->rx_unposted = 0;
	}
}

uint8_t *vnet_transmit_buffer(struct vnet *net)
{
	uint32_t used;
	struct vnet_buffer *done;
	while ((done = virtq_get_used(&net->tx, &used)) != NULL)
		net->tx_free[net->tx_free_count++] = done;
	if (net->tx_free_count == 0)
		return NULL;
	return net->tx_free[--net->tx_free_count]->bytes + VNET_HDR_BYTES;
}

void vnet_transmit(struct vnet *net, uint8_t *frame, uint32_t len)
{
	struct vnet_buffer *buffer = (struct vnet_buffer *)(frame - VNET_HDR_BYTES);
	memset(buffer->bytes, 0, VNET_HDR_BYTES);
	struct virtq_buffer b = { (uintptr_t)buffer->bytes, VNET_HDR_BYTES + len, false };
	virtq_add(&net->tx, &b, 1, buffer);
	virtq_kick(net->base, &net->tx);
}
