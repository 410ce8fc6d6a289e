// UDP blaster for the benchmarks: raw IPv4/UDP frames (64 bytes on the wire
// by default) from one socket with sendmmsg, round-robin over NFLOWS source
// ports, unpaced (rate 0) or paced to RATE packets/s. Bounded by SECONDS and
// by COUNT (0: no count limit). Prints one JSON line with what it sent.
// Flow j has source port SPORT_BASE + j % 60000 and destination port
// DPORT + j / 60000; the flows sent are FIRST .. FIRST + NFLOWS - 1 (FIRST
// 0 by default), so flows can be created a chunk at a time.
//   blast SRC DST DPORT SPORT_BASE NFLOWS RATE SECONDS COUNT [PAYLOAD [FIRST]]
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint16_t fold(uint32_t s) {
	while (s >> 16) s = (s & 0xffff) + (s >> 16);
	return (uint16_t)s;
}

static uint32_t sum16(const void *p, size_t n, uint32_t s) {
	const uint8_t *b = p;
	for (size_t i = 0; i + 1 < n; i += 2) s += (b[i] << 8) | b[i + 1];
	if (n & 1) s += b[n - 1] << 8;
	return s;
}

int main(int argc, char **argv) {
	if (argc < 9) {
		fprintf(stderr, "usage: blast SRC DST DPORT SPORT_BASE NFLOWS RATE SECONDS COUNT [PAYLOAD [FIRST]]\n");
		return 2;
	}
	struct in_addr src, dst;
	if (!inet_pton(AF_INET, argv[1], &src) || !inet_pton(AF_INET, argv[2], &dst)) return 2;
	int dport = atoi(argv[3]), sbase = atoi(argv[4]);
	long nflows = atol(argv[5]);
	double rate = atof(argv[6]), seconds = atof(argv[7]);
	long count = atol(argv[8]);
	int payload = argc > 9 ? atoi(argv[9]) : 18;  // 14 + 20 + 8 + 18 + 4 FCS = 64
	long first = argc > 10 ? atol(argv[10]) : 0;
	if (first < 0 || first > 1000000 || nflows < 1 || nflows > 1000000 || payload < 0 || payload > 1400 || seconds <= 0 || seconds > 600)
		return 2;
	int len = sizeof(struct iphdr) + sizeof(struct udphdr) + payload;
	uint8_t *pkts = calloc(nflows, len);
	if (!pkts) return 1;
	for (long i = 0; i < nflows; i++) {
		uint8_t *p = pkts + i * len;
		struct iphdr *ip = (struct iphdr *)p;
		struct udphdr *udp = (struct udphdr *)(p + sizeof(*ip));
		ip->version = 4; ip->ihl = 5; ip->ttl = 64; ip->protocol = IPPROTO_UDP;
		ip->tot_len = htons(len); ip->saddr = src.s_addr; ip->daddr = dst.s_addr;
		long j = first + i;
		udp->source = htons((uint16_t)(sbase + (j % 60000)));
		udp->dest = htons((uint16_t)(dport + (j / 60000)));
		udp->len = htons(sizeof(*udp) + payload);
		memset(p + sizeof(*ip) + sizeof(*udp), 0xab, payload);
		uint32_t s = sum16(&ip->saddr, 8, 0) + IPPROTO_UDP + sizeof(*udp) + payload;
		s = sum16(udp, sizeof(*udp) + payload, s);
		uint16_t c = ~fold(s);
		udp->check = htons(c ? c : 0xffff);
	}
	int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
	if (fd < 0) { perror("socket"); return 1; }
	struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr = dst};
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	memset(msgs, 0, sizeof(msgs));
	long sent = 0, errors = 0, next = 0;
	double t0 = now(), t = t0;
	while ((t = now()) - t0 < seconds && (!count || sent < count)) {
		long n = BATCH;
		if (rate > 0) {
			long due = (long)((t - t0) * rate) + 1 - sent;
			if (due <= 0) { struct timespec ns = {0, 20000}; nanosleep(&ns, NULL); continue; }
			if (due < n) n = due;
		}
		if (count && count - sent < n) n = count - sent;
		for (long i = 0; i < n; i++) {
			iov[i].iov_base = pkts + ((next + i) % nflows) * len;
			iov[i].iov_len = len;
			msgs[i].msg_hdr.msg_iov = &iov[i];
			msgs[i].msg_hdr.msg_iovlen = 1;
			msgs[i].msg_hdr.msg_name = &to;
			msgs[i].msg_hdr.msg_namelen = sizeof(to);
		}
		int r = sendmmsg(fd, msgs, n, 0);
		if (r < 0) { errors++; if (errno != ENOBUFS && errno != EAGAIN) break; continue; }
		sent += r; next += r;
	}
	printf("{\"sent\": %ld, \"seconds\": %.6f, \"errors\": %ld}\n", sent, now() - t0, errors);
	return 0;
}
