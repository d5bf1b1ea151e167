/*
 * net-echo.c - a network peer on the VMM's virtio-net device: answers ARP requests and ICMP echo
 * requests for its IPv4 address, and echoes UDP datagrams sent to port 7. Runs at CPL 3 on the
 * runtime in guests/rt/ (rt.h), polling the device (guests/rt/virtio-net.h).
 *
 * Contract with the host:
 *   - ELF64 linked at 1 MiB, entered by the VMM's ELF64 loader; the command line (hvm_start_info
 *     cmdline_paddr) holds `ip=A.B.C.D`, the guest's address.
 *   - Device: the first virtio-mmio slot (0xd0000000 + i * 0x1000) whose DeviceID is 1; the
 *     driver takes VERSION_1, MAC and STATUS, a 64-entry receive queue with 32 buffers of
 *     2048 bytes, and a transmit queue; no interrupts.
 *   - Output on COM1: "net-echo: ready ip A.B.C.D mac xx:xx:xx:xx:xx:xx" once set up. Exit
 *     through isa-debug-exit: 0x7e after "net-echo: no virtio-net device found" or "net-echo:
 *     no ip= on the command line", 0x7f after "net-echo BAD: <what>". Otherwise runs forever.
 *   - Answers: ARP requests for its address (a reply from its MAC); ICMP echo requests to it (an
 *     echo reply with the same identifier, sequence and data); UDP datagrams to port 7 (the same
 *     payload back, ports and addresses swapped). Everything else is ignored. A device that
 *     flags DEVICE_NEEDS_RESET is set up again ("net-echo: device reset").
 */
#include "rt/rt.h"
#include "rt/virtio-net.h"

#define ETH_ARP 0x0806
#define ETH_IPV4 0x0800
#define IP_ICMP 1
#define IP_UDP 17
#define ECHO_PORT 7
/* How often (in empty polls of the receive ring) Status is read for DEVICE_NEEDS_RESET: a VM exit each. */
#define NEEDS_RESET_CHECK_POLLS (1UL << 20)

static struct vnet net;
static uint8_t my_ip[4];

static uint16_t be16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static void put_be16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

/* The Internet checksum (RFC 1071) of `len` bytes. */
static uint16_t checksum(const uint8_t *p, uint32_t len)
{
	uint32_t sum = 0;
	for (; len > 1; p += 2, len -= 2)
		sum += be16(p);
	if (len)
		sum += (uint32_t)p[0] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static bool parse_ip(const char *s, uint8_t out[4])
{
	for (int i = 0; i < 4; i++) {
		uint32_t value = 0;
		int digits = 0;
		for (; *s >= '0' && *s <= '9' && digits < 4; s++, digits++)
			value = value * 10 + (uint32_t)(*s - '0');
		if (digits == 0 || value > 255)
			return false;
		out[i] = (uint8_t)value;
		if (i < 3 && *s++ != '.')
			return false;
	}
	return *s == 0 || *s == ' ';
}

/* ip=A.B.C.D from the command line. */
static bool read_ip(void)
{
	if (!rt_start_info)
		return false;
	const char *cmdline = (const char *)*(volatile uint64_t *)(rt_start_info + 24);
	if (cmdline == NULL)
		return false;
	for (const char *p = cmdline; *p; p++) {
		if ((p == cmdline || p[-1] == ' ') && p[0] == 'i' && p[1] == 'p' && p[2] == '=')
			return parse_ip(p + 3, my_ip);
	}
	return false;
}

static void put_ip(const uint8_t *ip)
{
	for (int i = 0; i < 4; i++) {
		if (i)
			putc('.');
		put_dec(ip[i]);
	}
}

static void put_mac(const uint8_t *mac)
{
	static const char hex[] = "0123456789abcdef";
	for (int i = 0; i < 6; i++) {
		if (i)
			putc(':');
		putc(hex[mac[i] >> 4]);
		putc(hex[mac[i] & 15]);
	}
}

/* Sends `frame` (`len` bytes) back where it came from: Ethernet addresses swapped into `out`. */
static uint8_t *reply_buffer(const uint8_t *frame, uint32_t len)
{
	uint8_t *out = vnet_transmit_buffer(&net);
	if (out == NULL)
		return NULL;
	memcpy(out, frame, len);
	memcpy(out, frame + 6, 6);
	memcpy(out + 6, net.mac, 6);
	return out;
}

static void answer_arp(const uint8_t *frame, uint32_t len)
{
	const uint8_t *arp = frame + 14;
	if (len < 14 + 28 || be16(arp) != 1 || be16(arp + 2) != ETH_IPV4 || arp[4] != 6 || arp[5] != 4 || be16(arp + 6) != 1)
		return;
	if (memcmp(arp + 24, my_ip, 4) != 0)
		return;
	uint8_t *out = reply_buffer(frame, 14 + 28);
	if (out == NULL)
		return;
	uint8_t *reply = out + 14;
	put_be16(reply + 6, 2);
	memcpy(reply + 18, arp + 8, 10); /* target: the asker's MAC and IP */
	memcpy(reply + 8, net.mac, 6);
	memcpy(reply + 14, my_ip, 4);
	vnet_transmit(&net, out, 14 + 28);
}

static void answer_ipv4(const uint8_t *frame, uint32_t len)
{
	const uint8_t *ip = frame + 14;
	if (len < 14 + 20 || (ip[0] >> 4) != 4)
		return;
	uint32_t header = (uint32_t)(ip[0] & 15) * 4, total = be16(ip + 2);
	if (header < 20 || total < header || 14 + total > len || memcmp(ip + 16, my_ip, 4) != 0)
		return;
	if ((be16(ip + 6) & 0x3fff) != 0)
		return; /* a fragment */
	const uint8_t *payload = ip + header;
	uint32_t payload_len = total - header;
	if (ip[9] == IP_ICMP) {
		if (payload_len < 8 || payload[0] != 8 || payload[1] != 0)
			return;
	} else if (ip[9] == IP_UDP) {
		if (payload_len < 8 || be16(payload + 2) != ECHO_PORT || be16(payload + 4) > payload_len)
			return;
	} else {
		return;
	}
	uint8_t *out = reply_buffer(frame, 14 + total);
	if (out == NULL)
		return;
	uint8_t *rip = out + 14, *rpayload = rip + header;
	memcpy(rip + 16, ip + 12, 4);
	memcpy(rip + 12, my_ip, 4);
	rip[8] = 64;
	put_be16(rip + 10, 0);
	put_be16(rip + 10, checksum(rip, header));
	if (ip[9] == IP_ICMP) {
		rpayload[0] = 0; /* echo reply */
		put_be16(rpayload + 2, 0);
		put_be16(rpayload + 2, checksum(rpayload, payload_len));
	} else {
		/* Ports swapped; with the addresses swapped too, the UDP checksum still holds. */
		memcpy(rpayload, payload + 2, 2);
		memcpy(rpayload + 2, payload, 2);
	}
	vnet_transmit(&net, out, 14 + total);
}

static void handle(const uint8_t *frame, uint32_t len)
{
	static const uint8_t broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	if (memcmp(frame, net.mac, 6) != 0 && memcmp(frame, broadcast, 6) != 0)
		return;
	uint16_t type = be16(frame + 12);
	if (type == ETH_ARP)
		answer_arp(frame, len);
	else if (type == ETH_IPV4)
		answer_ipv4(frame, len);
}

static void setup(void)
{
	const char *failure = vnet_init(&net, net.base);
	if (failure != NULL) {
		puts("net-echo BAD: ");
		puts(failure);
		putc('\n');
		debug_exit(0x7f);
	}
}

int main(void)
{
	if (!read_ip()) {
		puts("net-echo: no ip= on the command line\n");
		debug_exit(0x7e);
	}
	net.base = vnet_find();
	if (net.base == 0) {
		puts("net-echo: no virtio-net device found\n");
		debug_exit(0x7e);
	}
	setup();
	puts("net-echo: ready ip ");
	put_ip(my_ip);
	puts(" mac ");
	put_mac(net.mac);
	putc('\n');
	for (unsigned long idle = 0;; ) {
		uint32_t len;
		uint8_t *frame = vnet_receive(&net, &len);
		if (frame == NULL) {
			cpu_relax();
			if (++idle % NEEDS_RESET_CHECK_POLLS == 0 && vnet_needs_reset(&net)) {
				puts("net-echo: device reset\n");
				setup();
			}
			continue;
		}
		idle = 0;
		handle(frame, len);
		vnet_receive_done(&net, frame);
	}
}
