/*
 * virtio-net.h - a polled virtio-net driver (virtio 1.x section 5.1) over virtio-mmio: queue 0
 * receives, queue 1 transmits, one frame per buffer (no mergeable buffers, no offloads).
 *
 * Use: vnet_init() the device, then vnet_receive() / vnet_receive_done() for incoming frames and
 * vnet_transmit_buffer() / vnet_transmit() for outgoing ones. Buffers belong to struct vnet.
 */
#ifndef RT_VIRTIO_NET_H
#define RT_VIRTIO_NET_H

#include "virtio.h"

#define VIRTIO_ID_NET 1
#define VNET_MMIO_BASE 0xd0000000UL
#define VNET_MMIO_STRIDE 0x1000UL
#define VNET_MMIO_SLOTS 8

/* Feature bits (5.1.3). */
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_STATUS 16
#define VIRTIO_NET_S_LINK_UP 1

/* virtio_net_config offsets (5.1.4). */
#define VIRTIO_NET_CONFIG_MAC 0x00
#define VIRTIO_NET_CONFIG_STATUS 0x06

#define VNET_SUPPORTED_FEATURES                                                                    \
	(VIRTIO_FEATURE(VIRTIO_F_VERSION_1) | VIRTIO_FEATURE(VIRTIO_NET_F_MAC) | VIRTIO_FEATURE(VIRTIO_NET_F_STATUS))

/* struct virtio_net_hdr_v1 (5.1.6), as with VIRTIO_F_VERSION_1. */
struct virtio_net_hdr {
	uint8_t flags;
	uint8_t gso_type;
	uint16_t hdr_len;
	uint16_t gso_size;
	uint16_t csum_start;
	uint16_t csum_offset;
	uint16_t num_buffers;
};

#define VNET_HDR_BYTES 12
/* A buffer holds the header and a 1514-byte frame (5.1.6.3.1: at least 1526 bytes). */
#define VNET_BUFFER_BYTES 2048
#define VNET_RX_BUFFERS 32
#define VNET_TX_BUFFERS 16
#define VNET_QUEUE_SIZE 64

struct vnet_buffer {
	uint8_t bytes[VNET_BUFFER_BYTES];
} __attribute__((aligned(64)));

struct vnet {
	uintptr_t base;
	uint64_t features;
	uint8_t mac[6];
	uint16_t status;
	struct virtq rx;
	struct virtq tx;
	struct virtq_memory rx_memory;
	struct virtq_memory tx_memory;
	struct vnet_buffer rx_buffers[VNET_RX_BUFFERS];
	struct vnet_buffer tx_buffers[VNET_TX_BUFFERS];
	/* Transmit buffers not in flight. */
	struct vnet_buffer *tx_free[VNET_TX_BUFFERS];
	int tx_free_count;
	/* Receive buffers taken back from the device and not yet posted again. */
	int rx_unposted;
	/* Frames that came back shorter than a header plus an Ethernet header. */
	uint32_t rx_runts;
};

/* The base of the first virtio-mmio slot that holds a network device, or 0. */
uintptr_t vnet_find(void);
/* Resets the device at `base` and sets it up (3.1.1): features, both queues, every receive buffer
 * posted, DRIVER_OK, then the MAC from config space. Returns NULL, or what went wrong. */
const char *vnet_init(struct vnet *net, uintptr_t base);
/* The next received frame (Ethernet header first; its length in *len), or NULL when none has
 * arrived. Hand it back with vnet_receive_done() once done with it. */
uint8_t *vnet_receive(struct vnet *net, uint32_t *len);
void vnet_receive_done(struct vnet *net, uint8_t *frame);
/* A free transmit buffer to build a frame in (Ethernet header first), or NULL when all are in
 * flight; vnet_transmit() sends `len` bytes of it. */
uint8_t *vnet_transmit_buffer(struct vnet *net);
void vnet_transmit(struct vnet *net, uint8_t *frame, uint32_t len);
static inline bool vnet_needs_reset(const struct vnet *net)
{
	return (virtio_mmio_status(net->base) & VIRTIO_STATUS_DEVICE_NEEDS_RESET) != 0;
}

#endif
