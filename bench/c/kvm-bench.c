/*
 * kvm-bench.c - C reference for node-kvm's benchmarks.
 *
 * Drives /dev/kvm directly with nothing but libc + <linux/kvm.h>, so the
 * numbers show what the raw KVM API costs on this host; the Node benchmarks
 * are compared against them.
 *
 * Output: exactly one line of JSON on stdout and exit 0, or a message on
 * stderr and exit 1.
 *
 *   kvm-bench exits GUEST.bin COUNT     time COUNT port-0x80 I/O exits
 *   kvm-bench vm-cycles N               time N x (KVM_CREATE_VM + close)
 *   kvm-bench dirty-log SIZE_MIB ITERS  time ITERS x KVM_GET_DIRTY_LOG on a
 *                                       fully dirty SIZE_MIB slot
 *   kvm-bench stream DATA_MIB [SOURCE_CPU DESTINATION_CPU
 *                    [LISTEN_ADDRESS SOURCE_NETNS]]
 *                                       the least a checksummed page stream
 *                                       costs: DATA_MIB of guest RAM from one
 *                                       process to another over loopback TCP;
 *                                       with CPUs, each process pinned to one;
 *                                       with an address and a namespace, the
 *                                       destination (this process, started in
 *                                       its own network namespace by the
 *                                       caller) listens on LISTEN_ADDRESS
 *                                       (IPv4, ephemeral port) and the source
 *                                       joins the network namespace
 *                                       SOURCE_NETNS (a path such as
 *                                       /run/netns/NAME) to connect to it
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sched.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../native/crc32c.h"

#define GUEST_RAM_SIZE (1u << 20)   /* 1 MiB: all real mode can address */
#define GUEST_LOAD_ADDR 0x7c00u
#define TSS_ADDR 0xfffbd000u        /* 3 pages just below the 4 GiB BIOS area */
#define BENCH_PORT 0x80

static _Noreturn void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("kvm-bench: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* ioctl that dies with the request name and errno on failure. */
static int xioctl(int fd, unsigned long req, void *arg, const char *name)
{
    int r = ioctl(fd, req, arg);
    if (r < 0)
        die("%s: %s", name, strerror(errno));
    return r;
}
#define IOCTL(fd, req, arg) xioctl((fd), (req), (void *)(arg), #req)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static unsigned long long parse_count(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *s == '\0' || *end != '\0' || *s == '-' || v == 0)
        die("invalid %s '%s' (want a positive integer)", what, s);
    return v;
}

static int open_kvm(void)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm: %s", strerror(errno));
    int ver = ioctl(kvm, KVM_GET_API_VERSION, 0);
    if (ver != KVM_API_VERSION)
        die("KVM_GET_API_VERSION: got %d, want %d", ver, KVM_API_VERSION);
    return kvm;
}

static const char *exit_reason_name(uint32_t r)
{
    switch (r) {
    case KVM_EXIT_UNKNOWN: return "UNKNOWN";
    case KVM_EXIT_EXCEPTION: return "EXCEPTION";
    case KVM_EXIT_IO: return "IO";
    case KVM_EXIT_HLT: return "HLT";
    case KVM_EXIT_MMIO: return "MMIO";
    case KVM_EXIT_SHUTDOWN: return "SHUTDOWN";
    case KVM_EXIT_FAIL_ENTRY: return "FAIL_ENTRY";
    case KVM_EXIT_INTR: return "INTR";
    case KVM_EXIT_INTERNAL_ERROR: return "INTERNAL_ERROR";
    default: return "?";
    }
}

/* ---- exits ------------------------------------------------------------ */

static int cmd_exits(const char *guest_path, const char *count_str)
{
    unsigned long long count = parse_count(count_str, "COUNT");
    if (count > UINT32_MAX)
        die("COUNT %llu does not fit in ECX", count);

    int kvm = open_kvm();
    int vm = IOCTL(kvm, KVM_CREATE_VM, 0);
    IOCTL(vm, KVM_SET_TSS_ADDR, (unsigned long)TSS_ADDR);

    uint8_t *ram = mmap(NULL, GUEST_RAM_SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ram == MAP_FAILED)
        die("mmap guest RAM: %s", strerror(errno));
    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .guest_phys_addr = 0,
        .memory_size = GUEST_RAM_SIZE,
        .userspace_addr = (uintptr_t)ram,
    };
    IOCTL(vm, KVM_SET_USER_MEMORY_REGION, &region);

    FILE *f = fopen(guest_path, "rb");
    if (!f)
        die("open %s: %s", guest_path, strerror(errno));
    size_t max = GUEST_RAM_SIZE - GUEST_LOAD_ADDR;
    size_t n = fread(ram + GUEST_LOAD_ADDR, 1, max, f);
    if (ferror(f))
        die("read %s: %s", guest_path, strerror(errno));
    if (n == 0)
        die("%s is empty", guest_path);
    if (n == max && fgetc(f) != EOF)
        die("%s is too large", guest_path);
    fclose(f);

    int vcpu = IOCTL(vm, KVM_CREATE_VCPU, 0);
    int mmap_size = IOCTL(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if ((size_t)mmap_size < sizeof(struct kvm_run))
        die("KVM_GET_VCPU_MMAP_SIZE too small: %d", mmap_size);
    struct kvm_run *run = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE,
                               MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run: %s", strerror(errno));

    /* Real mode, flat segment 0. The reset state has CS base 0xffff0000;
     * only base+selector need changing, the rest is already real-mode. */
    struct kvm_sregs sregs;
    IOCTL(vcpu, KVM_GET_SREGS, &sregs);
    struct kvm_segment *segs[] = { &sregs.cs, &sregs.ds, &sregs.es,
                                   &sregs.ss, &sregs.fs, &sregs.gs };
    for (size_t i = 0; i < sizeof segs / sizeof segs[0]; i++) {
        segs[i]->base = 0;
        segs[i]->selector = 0;
    }
    IOCTL(vcpu, KVM_SET_SREGS, &sregs);

    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = GUEST_LOAD_ADDR;
    regs.rflags = 0x2;              /* bit 1 is reserved-must-be-1 */
    regs.rcx = count;
    IOCTL(vcpu, KVM_SET_REGS, &regs);

    unsigned long long exits = 0;
    double t0 = now_s();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die("KVM_RUN: %s (after %llu exits)", strerror(errno), exits);
        }
        if (run->exit_reason == KVM_EXIT_IO && run->io.port == BENCH_PORT) {
            exits++;
            continue;
        }
        if (run->exit_reason == KVM_EXIT_HLT)
            break;
        if (run->exit_reason == KVM_EXIT_IO)
            die("unexpected KVM_EXIT_IO: port 0x%x dir %s size %u count %u",
                run->io.port, run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in",
                run->io.size, run->io.count);
        if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
            die("unexpected exit INTERNAL_ERROR (suberror %u) after %llu exits",
                run->internal.suberror, exits);
        if (run->exit_reason == KVM_EXIT_FAIL_ENTRY)
            die("unexpected exit FAIL_ENTRY (hw reason 0x%llx) after %llu exits",
                (unsigned long long)run->fail_entry.hardware_entry_failure_reason, exits);
        die("unexpected exit reason %u (%s) after %llu exits",
            run->exit_reason, exit_reason_name(run->exit_reason), exits);
    }
    double secs = now_s() - t0;

    if (exits != count)
        die("exit count mismatch: guest made %llu port-0x%x exits, expected %llu",
            exits, BENCH_PORT, count);

    printf("{\"exits\":%llu,\"seconds\":%.9f,\"exitsPerSec\":%.1f,\"nsPerExit\":%.1f}\n",
           exits, secs, (double)exits / secs, secs * 1e9 / (double)exits);

    munmap(run, (size_t)mmap_size);
    close(vcpu);
    munmap(ram, GUEST_RAM_SIZE);
    close(vm);
    close(kvm);
    return 0;
}

/* ---- vm-cycles -------------------------------------------------------- */

static int cmd_vm_cycles(const char *n_str)
{
    unsigned long long n = parse_count(n_str, "N");
    int kvm = open_kvm();
    double t0 = now_s();
    for (unsigned long long i = 0; i < n; i++) {
        int vm = ioctl(kvm, KVM_CREATE_VM, 0);
        if (vm < 0)
            die("KVM_CREATE_VM (cycle %llu): %s", i, strerror(errno));
        close(vm);
    }
    double secs = now_s() - t0;
    printf("{\"cycles\":%llu,\"seconds\":%.9f,\"cyclesPerSec\":%.1f}\n",
           n, secs, (double)n / secs);
    close(kvm);
    return 0;
}

/* ---- dirty-log -------------------------------------------------------- */

static int cmd_dirty_log(const char *size_str, const char *iters_str)
{
    unsigned long long size_mib = parse_count(size_str, "SIZE_MIB");
    unsigned long long iters = parse_count(iters_str, "ITERS");
    if (size_mib > (1ull << 20))
        die("SIZE_MIB %llu too large", size_mib);
    size_t size = (size_t)size_mib << 20;
    long page = sysconf(_SC_PAGESIZE);
    size_t npages = size / (size_t)page;

    int kvm = open_kvm();
    int vm = IOCTL(kvm, KVM_CREATE_VM, 0);

    /* Must precede memslot creation: INITIALLY_SET only applies to slots
     * created afterwards, and with MANUAL_PROTECT KVM_GET_DIRTY_LOG does
     * not clear (nor re-protect), so every call sees a fully set bitmap. */
    if (ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) <= 0)
        die("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not supported");
    struct kvm_enable_cap cap = {
        .cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        .args = { KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET },
    };
    IOCTL(vm, KVM_ENABLE_CAP, &cap);

    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap %llu MiB: %s", size_mib, strerror(errno));
    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .flags = KVM_MEM_LOG_DIRTY_PAGES,
        .guest_phys_addr = 0,
        .memory_size = size,
        .userspace_addr = (uintptr_t)mem,
    };
    IOCTL(vm, KVM_SET_USER_MEMORY_REGION, &region);

    /* KVM copies ALIGN(npages, 64) bits: size the buffer in u64 words. */
    size_t words = (npages + 63) / 64;
    uint64_t *bitmap = calloc(words, sizeof(uint64_t));
    if (!bitmap)
        die("calloc bitmap: %s", strerror(errno));
    struct kvm_dirty_log log = { .slot = 0, .dirty_bitmap = bitmap };

    double t0 = now_s();
    for (unsigned long long i = 0; i < iters; i++) {
        if (i + 1 == iters)
            memset(bitmap, 0, words * sizeof(uint64_t)); /* prove the last call fills it */
        if (ioctl(vm, KVM_GET_DIRTY_LOG, &log) < 0)
            die("KVM_GET_DIRTY_LOG (call %llu): %s", i, strerror(errno));
    }
    double secs = now_s() - t0;

    for (size_t p = 0; p < npages; p++)
        if (!(bitmap[p / 64] >> (p % 64) & 1))
            die("dirty bitmap not all ones: page %zu clear on the last call", p);

    printf("{\"sizeMiB\":%llu,\"iterations\":%llu,\"seconds\":%.9f,\"msPerCall\":%.6f}\n",
           size_mib, iters, secs, secs * 1e3 / (double)iters);

    free(bitmap);
    close(vm);
    munmap(mem, size);
    close(kvm);
    return 0;
}

/*
 * The work every live migration of filled RAM does, with nothing else: the source copies each
 * 2 MiB batch of non-zero pages out of guest RAM (the guest may write them meanwhile), checksums
 * the copy (CRC-32C, in the same pass) and writes it to the socket; the destination reads 4 MiB at a time,
 * checksums, and pwrites the data into the memfd of its new (untouched) guest RAM. One thread
 * per side, as in node-kvm. Timed by the destination from its "go" to the last byte placed.
 */
#define STREAM_BATCH_BYTES (2u << 20)
#define STREAM_READ_BYTES (4u << 20)
#define STREAM_PAGE_BYTES 4096u

struct stream_header {
    uint64_t guest_phys_addr;
    uint32_t length;
    uint32_t crc32c;
};

/* CRC-32C with node-kvm's own code (native/crc32c.cc, linked in): the same checksum at the same speed. */
static uint32_t crc32c(uint32_t crc, const uint8_t *p, size_t n)
{
    return ~nodekvm_crc32c_register(~crc, p, n);
}

/* Known answers, and the fast path against the tables on a buffer long enough for every path. */
static void crc32c_check(void)
{
    if (crc32c(0, (const uint8_t *)"123456789", 9) != 0xE3069283u) die("stream: CRC-32C self-test failed");
    size_t n = 3 * 8192 * 2 + 13;
    uint8_t *data = malloc(n);
    if (!data) die("stream: out of memory");
    for (size_t i = 0; i < n; i++) data[i] = (uint8_t)(i * 131 + (i >> 7));
    uint32_t fast = crc32c(crc32c(0, data, 1000), data + 1000, n - 1000);
    if (fast != ~nodekvm_crc32c_register_portable(~0u, data, n)) die("stream: CRC-32C self-test failed");
    free(data);
}

static int page_is_zero(const uint8_t *page)
{
    uint64_t any = 0;
    for (unsigned i = 0; i < STREAM_PAGE_BYTES; i += 8) {
        uint64_t word;
        memcpy(&word, page + i, 8);
        any |= word;
    }
    return any == 0;
}

static void write_all(int fd, const void *data, size_t n)
{
    const uint8_t *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) die("stream: write: %s", strerror(errno));
        p += w;
        n -= (size_t)w;
    }
}

static void *new_ram(size_t bytes, int *fd_out)
{
    int fd = memfd_create("kvm-bench-ram", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)bytes) < 0) die("stream: memfd: %s", strerror(errno));
    void *ram = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ram == MAP_FAILED) die("stream: mmap: %s", strerror(errno));
    *fd_out = fd;
    return ram;
}

static _Noreturn void stream_source(struct sockaddr_in addr, size_t data_bytes)
{
    int ram_fd;
    uint8_t *ram = new_ram(data_bytes, &ram_fd);
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < data_bytes; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        memcpy(ram + i, &x, 8);
    }
    uint8_t *section = malloc(sizeof(struct stream_header) + STREAM_BATCH_BYTES);
    if (!section) die("stream: out of memory");
    memset(section, 0, sizeof(struct stream_header) + STREAM_BATCH_BYTES);
    int sock = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        char host[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &addr.sin_addr, host, sizeof host);
        die("stream: connect to %s:%u: %s", host, (unsigned)ntohs(addr.sin_port), strerror(errno));
    }
    char go;
    if (read(sock, &go, 1) != 1) die("stream: no go from the destination");
    for (size_t at = 0; at < data_bytes; at += STREAM_BATCH_BYTES) {
        size_t batch = data_bytes - at < STREAM_BATCH_BYTES ? data_bytes - at : STREAM_BATCH_BYTES;
        uint8_t *out = section + sizeof(struct stream_header);
        size_t length = 0;
        uint32_t reg = ~0u;
        /* Copied and checksummed in one pass, as node-kvm's source does (native/checksum.cc). */
        for (size_t page = 0; page < batch; page += STREAM_PAGE_BYTES) {
            if (page_is_zero(ram + at + page)) continue;
            reg = nodekvm_copy_crc32c_register(reg, out + length, ram + at + page, STREAM_PAGE_BYTES);
            length += STREAM_PAGE_BYTES;
        }
        struct stream_header header = { at, (uint32_t)length, ~reg };
        memcpy(section, &header, sizeof header);
        write_all(sock, section, sizeof header + length);
    }
    shutdown(sock, SHUT_WR);
    char done;
    if (read(sock, &done, 1) != 1) die("stream: no answer from the destination");
    _exit(0);
}

static long parse_cpu(const char *s)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *s == '\0' || *end != '\0' || v < 0 || v >= CPU_SETSIZE) die("invalid CPU '%s'", s);
    return v;
}

/* Pins the calling process to one CPU (-1: leaves it as it is). */
static void pin_to_cpu(long cpu)
{
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET((int)cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) < 0) die("stream: sched_setaffinity(%ld): %s", cpu, strerror(errno));
}

/*
 * listen_address: IPv4 dotted to listen on (NULL: loopback); source_netns: the path of the network
 * namespace the source enters before it connects (NULL: stays in this one).
 */
static int cmd_stream(const char *data_mib_str, long source_cpu, long destination_cpu,
                      const char *listen_address, const char *source_netns)
{
    size_t data_bytes = (size_t)parse_count(data_mib_str, "DATA_MIB") << 20;
    crc32c_check();
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (listen_address && inet_pton(AF_INET, listen_address, &addr.sin_addr) != 1)
        die("invalid LISTEN_ADDRESS '%s' (want an IPv4 address, such as 10.0.0.2)", listen_address);
    /* Opened here, so that a wrong path fails before anything starts; entered by the source. */
    int netns_fd = -1;
    if (source_netns) {
        netns_fd = open(source_netns, O_RDONLY | O_CLOEXEC);
        if (netns_fd < 0) die("stream: open SOURCE_NETNS %s: %s", source_netns, strerror(errno));
    }
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    socklen_t len = sizeof addr;
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(listener, 1) < 0 ||
        getsockname(listener, (struct sockaddr *)&addr, &len) < 0)
        die("stream: listen on %s: %s", listen_address ? listen_address : "loopback", strerror(errno));
    /* Held open by the source only: hung up when it exits, so that a source that dies before it connects is noticed. */
    int alive[2];
    if (pipe2(alive, O_CLOEXEC) < 0) die("stream: pipe: %s", strerror(errno));
    pid_t child = fork();
    if (child < 0) die("stream: fork: %s", strerror(errno));
    if (child == 0) {
        close(alive[0]);
        close(listener);
        pin_to_cpu(source_cpu);
        if (netns_fd >= 0) {
            if (setns(netns_fd, CLONE_NEWNET) < 0)
                die("stream: setns(%s, CLONE_NEWNET): %s", source_netns, strerror(errno));
            close(netns_fd);
        }
        stream_source(addr, data_bytes);
    }
    close(alive[1]);
    if (netns_fd >= 0) close(netns_fd);
    pin_to_cpu(destination_cpu);

    struct pollfd waits[2] = { { .fd = listener, .events = POLLIN }, { .fd = alive[0], .events = POLLIN } };
    for (;;) {
        if (poll(waits, 2, -1) < 0) {
            if (errno == EINTR) continue;
            die("stream: poll: %s", strerror(errno));
        }
        if (waits[0].revents) break;
        if (waits[1].revents) {
            int status;
            waitpid(child, &status, 0);
            die("stream: the source exited before it connected (%s %d)",
                WIFEXITED(status) ? "status" : "signal", WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
        }
    }
    close(alive[0]);
    int sock = accept(listener, NULL, NULL);
    if (sock < 0) die("stream: accept: %s", strerror(errno));
    int ram_fd;
    new_ram(data_bytes, &ram_fd);
    uint8_t *buffer = malloc(STREAM_READ_BYTES);
    if (!buffer) die("stream: out of memory");
    memset(buffer, 0, STREAM_READ_BYTES);
    /* Parsed as it arrives, as node-kvm does: data placed and checksummed straight from each read. */
    struct stream_header header;
    size_t header_have = 0, data_left = 0, data_at = 0, placed = 0, mismatches = 0;
    uint32_t crc = 0;
    double start = now_s();
    write_all(sock, "g", 1);
    for (;;) {
        ssize_t got = read(sock, buffer, STREAM_READ_BYTES);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) die("stream: read: %s", strerror(errno));
        if (got == 0) break;
        size_t at = 0;
        while (at < (size_t)got) {
            if (data_left == 0) {
                size_t take = sizeof header - header_have;
                if (take > (size_t)got - at) take = (size_t)got - at;
                memcpy((uint8_t *)&header + header_have, buffer + at, take);
                header_have += take;
                at += take;
                if (header_have < sizeof header) break;
                header_have = 0;
                data_left = header.length;
                data_at = header.guest_phys_addr;
                crc = 0;
                if (data_left == 0) continue;
            }
            size_t take = data_left < (size_t)got - at ? data_left : (size_t)got - at;
            crc = crc32c(crc, buffer + at, take);
            for (size_t done = 0; done < take;) {
                ssize_t w = pwrite(ram_fd, buffer + at + done, take - done, (off_t)(data_at + done));
                if (w <= 0) die("stream: pwrite: %s", strerror(errno));
                done += (size_t)w;
            }
            at += take;
            data_at += take;
            data_left -= take;
            placed += take;
            if (data_left == 0 && crc != header.crc32c) mismatches++;
        }
    }
    double seconds = now_s() - start;
    write_all(sock, "x", 1);
    int status;
    waitpid(child, &status, 0);
    if (placed != data_bytes || mismatches != 0 || data_left != 0 || header_have != 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        die("stream: placed %zu of %zu bytes, %zu checksum mismatches", placed, data_bytes, mismatches);
    printf("{\"bytes\":%zu,\"seconds\":%.6f,\"bytesPerSec\":%.0f}\n", placed, seconds, (double)placed / seconds);
    return 0;
}

static _Noreturn void usage(void)
{
    die("usage:\n"
        "  kvm-bench exits GUEST.bin COUNT\n"
        "  kvm-bench vm-cycles N\n"
        "  kvm-bench dirty-log SIZE_MIB ITERS\n"
        "  kvm-bench stream DATA_MIB [SOURCE_CPU DESTINATION_CPU [LISTEN_ADDRESS SOURCE_NETNS]]");
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "exits") == 0)
        return cmd_exits(argv[2], argv[3]);
    if (argc == 3 && strcmp(argv[1], "vm-cycles") == 0)
        return cmd_vm_cycles(argv[2]);
    if (argc == 4 && strcmp(argv[1], "dirty-log") == 0)
        return cmd_dirty_log(argv[2], argv[3]);
    if (argc == 3 && strcmp(argv[1], "stream") == 0)
        return cmd_stream(argv[2], -1, -1, NULL, NULL);
    if (argc == 5 && strcmp(argv[1], "stream") == 0)
        return cmd_stream(argv[2], parse_cpu(argv[3]), parse_cpu(argv[4]), NULL, NULL);
    if (argc == 7 && strcmp(argv[1], "stream") == 0)
        return cmd_stream(argv[2], parse_cpu(argv[3]), parse_cpu(argv[4]), argv[5], argv[6]);
    usage();
}
