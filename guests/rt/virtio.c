/*
 * virtio.c - virtio-mmio transport and split virtqueues (see virtio.h).
 */
#include "virtio.h"

bool virtio_mmio_present(uintptr_t base)
{
	return virtio_mmio_read(base, VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC;
}

bool virtio_mmio_reset(uintptr_t base, unsigned long spins)
{
	virtio_mmio_write(base, VIRTIO_MMIO_STATUS, 0);
	/* 4.2.3.1: the driver waits for Status to read 0 before initializing again. */
	for (unsigned long i = 0; i < spins; i++) {
		if (virtio_mmio_status(base) == 0)
			return true;
		cpu_relax();
	}
	return false;
}

void virtio_mmio_add_status(uintptr_t base, uint32_t bits)
{
	virtio_mmio_write(base, VIRTIO_MMIO_STATUS, virtio_mmio_status(base) | bits);
}

uint64_t virtio_mmio_device_features(uintptr_t base)
{
	virtio_mmio_write(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	uint64_t low = virtio_mmio_read(base, VIRTIO_MMIO_DEVICE_FEATURES);
	virtio_mmio_write(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	uint64_t high = virtio_mmio_read(base, VIRTIO_MMIO_DEVICE_FEATURES);
	return high << 32 | low;
}

const char *virtio_mmio_negotiate(uintptr_t base, uint64_t supported, uint64_t *features)
{
	virtio_mmio_add_status(base, VIRTIO_STATUS_ACKNOWLEDGE);
	virtio_mmio_add_status(base, VIRTIO_STATUS_DRIVER);
	uint64_t offered = virtio_mmio_device_features(base);
	if (!(offered & VIRTIO_FEATURE(VIRTIO_F_VERSION_1)))
		return "the device does not offer VIRTIO_F_VERSION_1";
	uint64_t accepted = offered & supported;
	virtio_mmio_write(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	virtio_mmio_write(base, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)accepted);
	virtio_mmio_write(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	virtio_mmio_write(base, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(accepted >> 32));
	virtio_mmio_add_status(base, VIRTIO_STATUS_FEATURES_OK);
	if (!(virtio_mmio_status(base) & VIRTIO_STATUS_FEATURES_OK))
		return "the device did not accept our features (FEATURES_OK did not stick)";
	*features = accepted;
	return NULL;
}

uint32_t virtio_mmio_queue_max(uintptr_t base, uint16_t index)
{
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_SEL, index);
	return virtio_mmio_read(base, VIRTIO_MMIO_QUEUE_NUM_MAX);
}

bool virtio_mmio_queue_ready(uintptr_t base, uint16_t index)
{
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_SEL, index);
	return virtio_mmio_read(base, VIRTIO_MMIO_QUEUE_READY) != 0;
}

void virtio_mmio_queue_program(uintptr_t base, const struct virtq *vq)
{
	uint64_t desc = (uintptr_t)vq->desc, driver = (uintptr_t)vq->avail, device = (uintptr_t)vq->used;
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_SEL, vq->index);
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_NUM, vq->size);
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)driver);
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(driver >> 32));
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)device);
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(device >> 32));
}

void virtio_mmio_queue_enable(uintptr_t base, uint16_t index)
{
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_SEL, index);
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_READY, 1);
}

void virtio_mmio_notify(uintptr_t base, uint16_t index)
{
	virtio_mmio_write(base, VIRTIO_MMIO_QUEUE_NOTIFY, index);
}

uint16_t virtq_pick_size(uint32_t max)
{
	if (max > VIRTQ_MAX_SIZE)
		max = VIRTQ_MAX_SIZE;
	uint16_t size = 0;
	for (uint32_t candidate = 1; candidate <= max; candidate <<= 1)
		size = (uint16_t)candidate;
	return size;
}

void virtq_init(struct virtq *vq, uint16_t index, struct virtq_memory *memory, uint16_t size, bool event_idx)
{
	memset(memory, 0, sizeof(*memory));
	vq->index = index;
	vq->size = size;
	vq->event_idx = event_idx;
	vq->desc = memory->desc;
	vq->avail = &memory->avail;
	vq->used = &memory->used;
	vq->free_head = 0;
	vq->free_count = size;
	vq->next_avail = 0;
	vq->notified_avail = 0;
	vq->last_used = 0;
	vq->bogus_used = 0;
	for (uint16_t i = 0; i < size; i++) {
		vq->next_free[i] = (uint16_t)(i + 1);
		vq->chain_length[i] = 0;
		vq->cookie[i] = NULL;
	}
	/* Completions are polled: ask for no interrupts (2.7.7; with EVENT_IDX, flags stay 0 and
	 * used_event is left where the device may interrupt now and then, harmlessly: IF is 0). */
	if (!event_idx)
		vq->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
}

/* Takes `count` descriptors off the free list, fills them with `buffers` chained in order, and
 * returns the first. The caller checked free_count. */
static uint16_t fill_chain(struct virtq *vq, const struct virtq_buffer *buffers, int count)
{
	uint16_t head = vq->free_head, index = head;
	for (int i = 0; i < count; i++) {
		volatile struct virtq_desc *desc = &vq->desc[index];
		desc->addr = buffers[i].addr;
		desc->len = buffers[i].len;
		desc->flags = (uint16_t)((buffers[i].device_writes ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < count ? VIRTQ_DESC_F_NEXT : 0));
		desc->next = i + 1 < count ? vq->next_free[index] : 0;
		if (i + 1 < count)
			index = vq->next_free[index];
	}
	vq->free_head = vq->next_free[index];
	vq->free_count = (uint16_t)(vq->free_count - count);
	vq->chain_length[head] = (uint16_t)count;
	return head;
}

static void make_available(struct virtq *vq, uint16_t head, void *cookie)
{
	vq->cookie[head] = cookie;
	vq->avail->ring[vq->next_avail & (vq->size - 1)] = head;
	vq->next_avail++;
}

int virtq_add(struct virtq *vq, const struct virtq_buffer *buffers, int count, void *cookie)
{
	if (count < 1 || count > vq->free_count)
		return -1;
	uint16_t head = fill_chain(vq, buffers, count);
	make_available(vq, head, cookie);
	return head;
}

int virtq_add_indirect(struct virtq *vq, struct virtq_desc *table, const struct virtq_buffer *buffers, int count, void *cookie)
{
	if (count < 1 || vq->free_count < 1)
		return -1;
	for (int i = 0; i < count; i++) {
		table[i].addr = buffers[i].addr;
		table[i].len = buffers[i].len;
		table[i].flags = (uint16_t)((buffers[i].device_writes ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < count ? VIRTQ_DESC_F_NEXT : 0));
		table[i].next = (uint16_t)(i + 1 < count ? i + 1 : 0);
	}
	struct virtq_buffer ring_buffer = { (uintptr_t)table, (uint32_t)(count * sizeof(*table)), false };
	uint16_t head = fill_chain(vq, &ring_buffer, 1);
	vq->desc[head].flags = VIRTQ_DESC_F_INDIRECT;
	make_available(vq, head, cookie);
	return head;
}

void virtq_publish(struct virtq *vq)
{
	/* The ring entries and descriptors are written before the index that shows them (x86 keeps
	 * stores in order; the barrier keeps the compiler from reordering them). */
	compiler_barrier();
	vq->avail->idx = vq->next_avail;
}

bool virtq_kick(uintptr_t base, struct virtq *vq)
{
	uint16_t old = vq->notified_avail, new = vq->next_avail;
	virtq_publish(vq);
	vq->notified_avail = new;
	if (old == new)
		return false;
	/* The device's suppression state must be read after it can see the new index (2.7.10). */
	memory_barrier();
	bool notify;
	if (vq->event_idx) {
		uint16_t avail_event = *(volatile uint16_t *)((uintptr_t)vq->used + offsetof(struct virtq_used, ring) + vq->size * sizeof(struct virtq_used_elem));
		notify = (uint16_t)(new - avail_event - 1) < (uint16_t)(new - old);
	} else {
		notify = !(vq->used->flags & VIRTQ_USED_F_NO_NOTIFY);
	}
	if (notify)
		virtio_mmio_notify(base, vq->index);
	return notify;
}

void *virtq_get_used(struct virtq *vq, uint32_t *len)
{
	while (vq->used->idx != vq->last_used) {
		/* Read the element only after seeing the index that covers it. */
		compiler_barrier();
		volatile struct virtq_used_elem *elem = &vq->used->ring[vq->last_used & (vq->size - 1)];
		uint32_t head = elem->id;
		*len = elem->len;
		vq->last_used++;
		if (head >= vq->size || vq->cookie[head] == NULL) {
			vq->bogus_used++;
			continue;
		}
		void *cookie = vq->cookie[head];
		vq->cookie[head] = NULL;
		uint16_t tail = (uint16_t)head;
		for (uint16_t i = 1; i < vq->chain_length[head]; i++)
			tail = vq->next_free[tail];
		vq->next_free[tail] = vq->free_head;
		vq->free_head = (uint16_t)head;
		vq->free_count = (uint16_t)(vq->free_count + vq->chain_length[head]);
		vq->chain_length[head] = 0;
		return cookie;
	}
	return NULL;
}

int virtq_take_descriptors(struct virtq *vq, uint16_t *indexes, int count)
{
	int taken = 0;
	while (taken < count && vq->free_count > 0) {
		indexes[taken++] = vq->free_head;
		vq->free_head = vq->next_free[vq->free_head];
		vq->free_count--;
	}
	return taken;
}
