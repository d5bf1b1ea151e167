/*
 * virtio-blk.c - the polled virtio-blk driver (see virtio-blk.h).
 */
#include "virtio-blk.h"

#define REQUEST_QUEUE 0
/* Polls of Status while waiting for a reset to be acknowledged. */
#define RESET_SPINS (100 * RT_SPINS_PER_MS)
/* How often (in polls of the used ring) a wait also reads Status for DEVICE_NEEDS_RESET: each
 * read is a VM exit. */
#define NEEDS_RESET_CHECK_SPINS 16384

int vblk_count_slots(void)
{
	int slots = 0;
	while (slots < VBLK_MMIO_SLOTS && virtio_mmio_present(vblk_slot_base(slots)))
		slots++;
	return slots;
}

const char *vblk_init_until_queue(struct vblk *disk, uintptr_t base, struct virtq_memory *ring_memory, uint64_t declined)
{
	disk->base = base;
	disk->ring_memory = ring_memory;
	if (disk->timeout_spins == 0)
		disk->timeout_spins = VBLK_DEFAULT_TIMEOUT_SPINS;
	if (virtio_mmio_read(base, VIRTIO_MMIO_VERSION) != VIRTIO_MMIO_MODERN_VERSION)
		return "not a version 2 (virtio 1.x) virtio-mmio device";
	if (virtio_mmio_read(base, VIRTIO_MMIO_DEVICE_ID) != VIRTIO_ID_BLOCK)
		return "not a block device";
	if (!virtio_mmio_reset(base, RESET_SPINS))
		return "Status did not read 0 after a reset";
	const char *failure = virtio_mmio_negotiate(base, VBLK_SUPPORTED_FEATURES & ~declined, &disk->features);
	if (failure != NULL) {
		virtio_mmio_add_status(base, VIRTIO_STATUS_FAILED);
		return failure;
	}
	if (virtio_mmio_queue_ready(base, REQUEST_QUEUE))
		return "queue 0 is ready right after a reset";
	uint16_t size = virtq_pick_size(virtio_mmio_queue_max(base, REQUEST_QUEUE));
	if (size == 0)
		return "queue 0 does not exist (QueueNumMax 0)";
	virtq_init(&disk->vq, REQUEST_QUEUE, ring_memory, size, vblk_has(disk, VIRTIO_F_RING_EVENT_IDX));
	return NULL;
}

static uint32_t config_read(const struct vblk *disk, uint32_t offset)
{
	return virtio_mmio_read(disk->base, VIRTIO_MMIO_CONFIG + offset);
}

static void read_config(struct vblk *disk)
{
	/* 4.2.2.2: 32-bit accesses, a 64-bit field as two; retried until ConfigGeneration holds
	 * still across them (2.5.1). */
	uint32_t generation;
	do {
		generation = virtio_mmio_read(disk->base, VIRTIO_MMIO_CONFIG_GENERATION);
		disk->capacity = (uint64_t)config_read(disk, VIRTIO_BLK_CONFIG_CAPACITY + 4) << 32 | config_read(disk, VIRTIO_BLK_CONFIG_CAPACITY);
		disk->seg_max = vblk_has(disk, VIRTIO_BLK_F_SEG_MAX) ? config_read(disk, VIRTIO_BLK_CONFIG_SEG_MAX) : 0;
		disk->blk_size = vblk_has(disk, VIRTIO_BLK_F_BLK_SIZE) ? config_read(disk, VIRTIO_BLK_CONFIG_BLK_SIZE) : 0;
		bool discard = vblk_has(disk, VIRTIO_BLK_F_DISCARD), write_zeroes = vblk_has(disk, VIRTIO_BLK_F_WRITE_ZEROES);
		disk->max_discard_sectors = discard ? config_read(disk, VIRTIO_BLK_CONFIG_MAX_DISCARD_SECTORS) : 0;
		disk->max_discard_seg = discard ? config_read(disk, VIRTIO_BLK_CONFIG_MAX_DISCARD_SEG) : 0;
		disk->discard_sector_alignment = discard ? config_read(disk, VIRTIO_BLK_CONFIG_DISCARD_SECTOR_ALIGNMENT) : 0;
		disk->max_write_zeroes_sectors = write_zeroes ? config_read(disk, VIRTIO_BLK_CONFIG_MAX_WRITE_ZEROES_SECTORS) : 0;
		disk->max_write_zeroes_seg = write_zeroes ? config_read(disk, VIRTIO_BLK_CONFIG_MAX_WRITE_ZEROES_SEG) : 0;
		/* An 8-bit field, read 8 bits wide (4.2.2.2). */
		disk->write_zeroes_may_unmap = write_zeroes ? mmio_read8(disk->base + VIRTIO_MMIO_CONFIG + VIRTIO_BLK_CONFIG_WRITE_ZEROES_MAY_UNMAP) : 0;
	} while (generation != virtio_mmio_read(disk->base, VIRTIO_MMIO_CONFIG_GENERATION));
}

const char *vblk_init_finish(struct vblk *disk)
{
	virtio_mmio_queue_program(disk->base, &disk->vq);
	virtio_mmio_queue_enable(disk->base, REQUEST_QUEUE);
	if (!virtio_mmio_queue_ready(disk->base, REQUEST_QUEUE))
		return "queue 0 did not become ready";
	virtio_mmio_add_status(disk->base, VIRTIO_STATUS_DRIVER_OK);
	uint32_t status = virtio_mmio_status(disk->base);
	if (status & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
		return "the device needs a reset right after DRIVER_OK";
	if (!(status & VIRTIO_STATUS_DRIVER_OK))
		return "DRIVER_OK did not stick";
	read_config(disk);
	return NULL;
}

const char *vblk_init(struct vblk *disk, uintptr_t base, struct virtq_memory *ring_memory, uint64_t declined)
{
	const char *failure = vblk_init_until_queue(disk, base, ring_memory, declined);
	return failure != NULL ? failure : vblk_init_finish(disk);
}

bool vblk_submit(struct vblk *disk, struct vblk_request *request, uint32_t type, uint64_t sector,
		 const struct virtq_buffer *data, int count, bool indirect)
{
	if (count < 0 || count > VBLK_MAX_SEGMENTS)
		return false;
	request->header.type = type;
	request->header.reserved = 0;
	request->header.sector = sector;
	request->status = 0xff;
	request->done = false;
	request->used_len = 0;
	struct virtq_buffer buffers[VBLK_MAX_SEGMENTS + 2];
	buffers[0] = (struct virtq_buffer){ (uintptr_t)&request->header, sizeof(request->header), false };
	for (int i = 0; i < count; i++)
		buffers[1 + i] = data[i];
	buffers[1 + count] = (struct virtq_buffer){ (uintptr_t)&request->status, 1, true };
	int head = indirect ? virtq_add_indirect(&disk->vq, request->indirect, buffers, count + 2, request)
			    : virtq_add(&disk->vq, buffers, count + 2, request);
	if (head < 0)
		return false;
	request->in_flight = true;
	return true;
}

void vblk_kick(struct vblk *disk)
{
	virtq_kick(disk->base, &disk->vq);
}

int vblk_poll(struct vblk *disk)
{
	int completed = 0;
	uint32_t len;
	struct vblk_request *request;
	while ((request = virtq_get_used(&disk->vq, &len)) != NULL) {
		request->used_len = len;
		request->in_flight = false;
		request->done = true;
		completed++;
	}
	return completed;
}

/* Between polls of the used ring that found nothing: VBLK_TIMEOUT, VBLK_NEEDS_RESET or 0. */
static int keep_waiting(struct vblk *disk, unsigned long spins)
{
	if (spins >= disk->timeout_spins)
		return VBLK_TIMEOUT;
	if (spins % NEEDS_RESET_CHECK_SPINS == NEEDS_RESET_CHECK_SPINS - 1 && vblk_needs_reset(disk))
		return VBLK_NEEDS_RESET;
	cpu_relax();
	return 0;
}

int vblk_wait(struct vblk *disk, struct vblk_request *request)
{
	for (unsigned long spins = 0; !request->done; spins++) {
		if (vblk_poll(disk) > 0)
			continue;
		int failure = keep_waiting(disk, spins);
		if (failure != 0)
			return failure;
	}
	return request->status;
}

int vblk_wait_any(struct vblk *disk)
{
	for (unsigned long spins = 0;; spins++) {
		int completed = vblk_poll(disk);
		if (completed > 0)
			return completed;
		int failure = keep_waiting(disk, spins);
		if (failure != 0)
			return failure;
	}
}

int vblk_do(struct vblk *disk, uint32_t type, uint64_t sector, void *buffer, uint32_t bytes)
{
	struct virtq_buffer data = { (uintptr_t)buffer, bytes, type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID };
	struct vblk_request *request = &disk->sync_request;
	if (!vblk_submit(disk, request, type, sector, &data, bytes > 0 ? 1 : 0, false))
		return VBLK_QUEUE_FULL;
	vblk_kick(disk);
	return vblk_wait(disk, request);
}
