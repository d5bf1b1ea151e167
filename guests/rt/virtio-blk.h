/*
 * virtio-blk.h - a polled virtio-blk driver (virtio 1.x section 5.2) over virtio-mmio, one
 * request queue (queue 0).
 *
 * Use: vblk_init() a device, then either vblk_do() for one request at a time, or vblk_submit()
 * several, vblk_kick() once, and vblk_wait() for each. Request structs and data buffers must stay
 * put until their request completes; they are handed to the device by address.
 */
#ifndef RT_VIRTIO_BLK_H
#define RT_VIRTIO_BLK_H

#include "virtio.h"

/* Where the node-kvm VMM puts its virtio-mmio devices: slot i at base + i * stride. */
#define VBLK_MMIO_BASE 0xd0000000UL
#define VBLK_MMIO_STRIDE 0x1000UL
#define VBLK_MMIO_SLOTS 8

#define VIRTIO_ID_BLOCK 2

/* Feature bits (5.2.3). */
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

/* virtio_blk_config offsets in the device configuration space (5.2.4). */
#define VIRTIO_BLK_CONFIG_CAPACITY 0x00
#define VIRTIO_BLK_CONFIG_SIZE_MAX 0x08
#define VIRTIO_BLK_CONFIG_SEG_MAX 0x0c
#define VIRTIO_BLK_CONFIG_BLK_SIZE 0x14
#define VIRTIO_BLK_CONFIG_MAX_DISCARD_SECTORS 0x24
#define VIRTIO_BLK_CONFIG_MAX_DISCARD_SEG 0x28
#define VIRTIO_BLK_CONFIG_DISCARD_SECTOR_ALIGNMENT 0x2c
#define VIRTIO_BLK_CONFIG_MAX_WRITE_ZEROES_SECTORS 0x30
#define VIRTIO_BLK_CONFIG_MAX_WRITE_ZEROES_SEG 0x34
#define VIRTIO_BLK_CONFIG_WRITE_ZEROES_MAY_UNMAP 0x38

/* Request types and status values (5.2.6). */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_SECTOR_BYTES 512
#define VIRTIO_BLK_ID_BYTES 20

/* vblk_wait results other than a status byte. */
#define VBLK_TIMEOUT (-1)
#define VBLK_NEEDS_RESET (-2)
#define VBLK_QUEUE_FULL (-3)

/* Data buffers per request this driver builds (the indirect table's size). */
#define VBLK_MAX_SEGMENTS 8

/* Features this driver understands and accepts when offered. */
#define VBLK_SUPPORTED_FEATURES                                                                      \
	(VIRTIO_FEATURE(VIRTIO_F_VERSION_1) | VIRTIO_FEATURE(VIRTIO_F_RING_INDIRECT_DESC) |          \
	 VIRTIO_FEATURE(VIRTIO_F_RING_EVENT_IDX) | VIRTIO_FEATURE(VIRTIO_BLK_F_SEG_MAX) |           \
	 VIRTIO_FEATURE(VIRTIO_BLK_F_RO) | VIRTIO_FEATURE(VIRTIO_BLK_F_BLK_SIZE) |                   \
	 VIRTIO_FEATURE(VIRTIO_BLK_F_FLUSH) | VIRTIO_FEATURE(VIRTIO_BLK_F_DISCARD) |                 \
	 VIRTIO_FEATURE(VIRTIO_BLK_F_WRITE_ZEROES))

/* Default bound of a wait for one completion: about 5 s (see RT_SPINS_PER_MS). */
#define VBLK_DEFAULT_TIMEOUT_SPINS (5000 * RT_SPINS_PER_MS)

struct virtio_blk_req_header {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

/* The data of a DISCARD or WRITE_ZEROES request, one per range. */
struct virtio_blk_discard_write_zeroes {
	uint64_t sector;
	uint32_t num_sectors;
	uint32_t flags;
};

struct vblk_request {
	/* Device-readable: the header, and the indirect table when the request uses one. */
	struct virtio_blk_req_header header;
	struct virtq_desc indirect[VBLK_MAX_SEGMENTS + 2] __attribute__((aligned(16)));
	/* Device-writable. */
	volatile uint8_t status;
	bool in_flight;
	bool done;
	/* Bytes the device says it wrote (data and status). */
	uint32_t used_len;
};

struct vblk {
	uintptr_t base;
	uint64_t features;
	/* From the configuration space (fields of features not negotiated are 0). */
	uint64_t capacity;
	uint32_t seg_max;
	uint32_t blk_size;
	uint32_t max_discard_sectors;
	uint32_t max_discard_seg;
	uint32_t discard_sector_alignment;
	uint32_t max_write_zeroes_sectors;
	uint32_t max_write_zeroes_seg;
	uint8_t write_zeroes_may_unmap;
	struct virtq vq;
	struct virtq_memory *ring_memory;
	/* How long vblk_wait polls for one completion. */
	unsigned long timeout_spins;
	/* The request vblk_do uses. */
	struct vblk_request sync_request;
};

/* How many consecutive slots from VBLK_MMIO_BASE hold a virtio-mmio device (any kind). */
int vblk_count_slots(void);
static inline uintptr_t vblk_slot_base(int slot)
{
	return VBLK_MMIO_BASE + (uintptr_t)slot * VBLK_MMIO_STRIDE;
}

/*
 * Resets the device at `base` and sets it up (3.1.1): features (VBLK_SUPPORTED_FEATURES that it
 * offers, minus `declined`), queue 0 in `ring_memory`, DRIVER_OK, then reads the configuration.
 * Also the way back from DEVICE_NEEDS_RESET. Returns NULL, or what went wrong.
 */
const char *vblk_init(struct vblk *disk, uintptr_t base, struct virtq_memory *ring_memory, uint64_t declined);
/* The first steps of vblk_init, for tests that set queue 0 up themselves: reset, negotiate,
 * and an empty queue in software. Returns NULL, or what went wrong. */
const char *vblk_init_until_queue(struct vblk *disk, uintptr_t base, struct virtq_memory *ring_memory, uint64_t declined);
/* The rest: program and enable queue 0, DRIVER_OK, read the configuration. */
const char *vblk_init_finish(struct vblk *disk);

static inline bool vblk_has(const struct vblk *disk, int feature)
{
	return (disk->features & VIRTIO_FEATURE(feature)) != 0;
}

static inline bool vblk_needs_reset(const struct vblk *disk)
{
	return (virtio_mmio_status(disk->base) & VIRTIO_STATUS_DEVICE_NEEDS_RESET) != 0;
}

/*
 * Queues a request: header (type, sector), the `count` data buffers as given (their direction
 * included), and the status byte; through an indirect table when `indirect` (the feature must
 * be negotiated). Not yet visible to the device: see vblk_kick. Returns false when the queue has
 * no room.
 */
bool vblk_submit(struct vblk *disk, struct vblk_request *request, uint32_t type, uint64_t sector,
		 const struct virtq_buffer *data, int count, bool indirect);
/* Publishes the submitted requests and notifies the device where it wants to be. */
void vblk_kick(struct vblk *disk);
/* Marks every completed request done; returns how many completed. */
int vblk_poll(struct vblk *disk);
/* Waits for `request` (up to disk->timeout_spins): its status byte, VBLK_TIMEOUT, or
 * VBLK_NEEDS_RESET when the device flags DEVICE_NEEDS_RESET. */
int vblk_wait(struct vblk *disk, struct vblk_request *request);
/* Waits for at least one completion (up to disk->timeout_spins): how many completed,
 * VBLK_TIMEOUT or VBLK_NEEDS_RESET. */
int vblk_wait_any(struct vblk *disk);
/* One request, waited for: `bytes` at `buffer` (none for 0), in the direction `type` implies
 * (device-writable for IN and GET_ID). Returns as vblk_wait, or VBLK_QUEUE_FULL. */
int vblk_do(struct vblk *disk, uint32_t type, uint64_t sector, void *buffer, uint32_t bytes);

#endif
