/*
 * virtio.h - the virtio-mmio transport (virtio 1.x section 4.2, the version 2 "modern" register
 * layout) and split virtqueues (section 2.7), polled: no interrupts. Guest-physical addresses are
 * the guest's own pointers (the loader's identity map).
 */
#ifndef RT_VIRTIO_H
#define RT_VIRTIO_H

#include "rt.h"

/* virtio-mmio registers (4.2.2), 32-bit wide and aligned. */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

/* "virt" read as a little-endian u32. */
#define VIRTIO_MMIO_MAGIC 0x74726976u
#define VIRTIO_MMIO_MODERN_VERSION 2

/* InterruptStatus bits (4.2.2). */
#define VIRTIO_MMIO_INT_VRING 0x1
#define VIRTIO_MMIO_INT_CONFIG 0x2

/* Device status bits (2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER 0x02
#define VIRTIO_STATUS_DRIVER_OK 0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_DEVICE_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

/* Transport feature bits (6). */
#define VIRTIO_F_RING_INDIRECT_DESC 28
#define VIRTIO_F_RING_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

#define VIRTIO_FEATURE(bit) (1ULL << (bit))

/* Split virtqueue (2.7). */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

/* The largest queue this driver sets up; a queue takes three pages of struct virtq_memory. */
#define VIRTQ_MAX_SIZE 256

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

/* used_event follows ring[size] (with VIRTIO_F_RING_EVENT_IDX). */
struct virtq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[VIRTQ_MAX_SIZE + 1];
};

struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};

/* avail_event follows ring[size] (with VIRTIO_F_RING_EVENT_IDX). */
struct virtq_used {
	uint16_t flags;
	uint16_t idx;
	struct virtq_used_elem ring[VIRTQ_MAX_SIZE];
	uint16_t avail_event_at_max_size;
};

/* The three parts of one queue, each on its own page (above the 16/2/4-byte alignments). */
struct virtq_memory {
	struct virtq_desc desc[VIRTQ_MAX_SIZE];
	union {
		struct virtq_avail avail;
		uint8_t avail_page[4096];
	};
	union {
		struct virtq_used used;
		uint8_t used_page[4096];
	};
} __attribute__((aligned(4096)));

/* One buffer of a request, in the order the device sees them. */
struct virtq_buffer {
	uint64_t addr;
	uint32_t len;
	bool device_writes;
};

struct virtq {
	uint16_t index;
	uint16_t size;
	bool event_idx;
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	uint16_t free_head;
	uint16_t free_count;
	/* avail->idx as this driver will publish it, and as it was at the last notify decision. */
	uint16_t next_avail;
	uint16_t notified_avail;
	uint16_t last_used;
	/* Used elements naming a descriptor that was not a head in flight (a device bug). */
	uint32_t bogus_used;
	/* The driver's own copy of the free list and chain links (the device never changes them,
	 * but a hostile test may scribble over desc[]). */
	uint16_t next_free[VIRTQ_MAX_SIZE];
	uint16_t chain_length[VIRTQ_MAX_SIZE];
	void *cookie[VIRTQ_MAX_SIZE];
};

static inline uint32_t virtio_mmio_read(uintptr_t base, uint32_t reg)
{
	return mmio_read32(base + reg);
}

static inline void virtio_mmio_write(uintptr_t base, uint32_t reg, uint32_t value)
{
	mmio_write32(base + reg, value);
}

static inline uint32_t virtio_mmio_status(uintptr_t base)
{
	return virtio_mmio_read(base, VIRTIO_MMIO_STATUS);
}

/* A virtio-mmio device answers at `base` (its magic value reads back). */
bool virtio_mmio_present(uintptr_t base);
/* Writes 0 to Status and waits (up to `spins` polls) until it reads 0. */
bool virtio_mmio_reset(uintptr_t base, unsigned long spins);
/* ORs `bits` into Status. */
void virtio_mmio_add_status(uintptr_t base, uint32_t bits);
uint64_t virtio_mmio_device_features(uintptr_t base);
/*
 * Steps 2-5 of the initialization (3.1.1) after a reset: ACKNOWLEDGE, DRIVER, accept the
 * offered features that are in `supported`, FEATURES_OK and check that it stuck. Returns NULL,
 * or what went wrong.
 */
const char *virtio_mmio_negotiate(uintptr_t base, uint64_t supported, uint64_t *features);
/* QueueNumMax of queue `index`, and whether it is ready. */
uint32_t virtio_mmio_queue_max(uintptr_t base, uint16_t index);
bool virtio_mmio_queue_ready(uintptr_t base, uint16_t index);
/* Tells the device queue `vq`'s size and ring addresses (not yet ready). */
void virtio_mmio_queue_program(uintptr_t base, const struct virtq *vq);
void virtio_mmio_queue_enable(uintptr_t base, uint16_t index);
void virtio_mmio_notify(uintptr_t base, uint16_t index);

/* The largest power of two <= min(max, VIRTQ_MAX_SIZE); 0 for 0. */
uint16_t virtq_pick_size(uint32_t max);
/* Empty rings and a full free list for a queue of `size` (a power of two) in `memory`. */
void virtq_init(struct virtq *vq, uint16_t index, struct virtq_memory *memory, uint16_t size, bool event_idx);
/*
 * Chains `count` buffers into free descriptors and puts the head on the available ring (not yet
 * published). `cookie` (not NULL) comes back from virtq_get_used. Returns the head, or -1 when
 * there are not enough free descriptors.
 */
int virtq_add(struct virtq *vq, const struct virtq_buffer *buffers, int count, void *cookie);
/* The same through an indirect table (`table`, 16-byte aligned, `count` entries): one ring
 * descriptor. */
int virtq_add_indirect(struct virtq *vq, struct virtq_desc *table, const struct virtq_buffer *buffers, int count, void *cookie);
/* Publishes what virtq_add made available; notifies the device unless it asked not to be
 * (VIRTQ_USED_F_NO_NOTIFY, or avail_event with EVENT_IDX). Returns whether it notified. */
bool virtq_kick(uintptr_t base, struct virtq *vq);
/* Publishes avail->idx without notifying. */
void virtq_publish(struct virtq *vq);
/* The cookie of the next used buffer (its chain freed, *len = bytes written), or NULL. Used
 * elements that name no chain in flight are skipped and counted in bogus_used. */
void *virtq_get_used(struct virtq *vq, uint32_t *len);
/* Descriptors taken off the free list for a hand-made chain (hostile tests): up to `count`
 * indexes into `indexes`; returns how many. They go back on the next virtq_init. */
int virtq_take_descriptors(struct virtq *vq, uint16_t *indexes, int count);

#endif
