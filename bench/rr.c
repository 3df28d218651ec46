/* SPDX-License-Identifier: Apache-2.0 */
/* rr: a small TCP request/response benchmark (netperf's TCP_RR and TCP_CRR, plus a stream).
 *
 *   rr -s [-p PORT] [-C CPU]                       server: runs until killed
 *   rr -c ADDR [-p PORT] [-m rr|crr|stream] [-t SECONDS] [-w WARMUP] [-C CPU]
 *
 * rr:     one connection, 1-byte request, 1-byte response, as fast as possible.
 * crr:    per transaction: connect, 1-byte request, 1-byte response, close. The server
 *         closes first, so TIME_WAIT sits on the server and client ports free at once.
 * stream: one connection, 128 KiB writes for the whole time (information only).
 *
 * The first byte of a connection names its kind ('R', 'C', 'S'). Long connections
 * (rr, stream) get a forked server child; crr is served inline. Latency is kept in a
 * histogram of 0.1 us buckets up to 100 ms (one overflow bucket above), and the client
 * prints one JSON object. Built statically by the suite so it runs in busybox.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BUCKETS 1000000 /* 0.1 us each: 100 ms */
#define STREAM_CHUNK (128 * 1024)

static uint32_t hist[BUCKETS + 1];
static double max_us;

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "rr: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void pin(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) < 0)
		die("sched_setaffinity");
}

static int full_read(int fd, char *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = read(fd, buf + got, len - got);

		if (n == 0)
			return 0;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		got += n;
	}
	return 1;
}

static void nodelay(int fd)
{
	int one = 1;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* -- server --------------------------------------------------------------------------- */

static void serve_echo(int fd)
{
	char b;

	if (write(fd, "R", 1) != 1) /* the answer to the first request */
		_exit(0);
	while (full_read(fd, &b, 1) == 1)
		if (write(fd, &b, 1) != 1)
			break;
	_exit(0);
}

static void serve_sink(int fd)
{
	static char buf[STREAM_CHUNK];
	uint64_t total = 0;
	ssize_t n;

	while ((n = read(fd, buf, sizeof(buf))) > 0 || (n < 0 && errno == EINTR))
		if (n > 0)
			total += n;
	(void)!write(fd, &total, sizeof(total));
	_exit(0);
}

static int server(int port, int cpu)
{
	struct sockaddr_in6 addr = { .sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = IN6ADDR_ANY_INIT };
	int one = 1, zero = 0;
	int lfd = socket(AF_INET6, SOCK_STREAM, 0);

	pin(cpu);
	signal(SIGCHLD, SIG_IGN); /* children reap themselves */
	signal(SIGPIPE, SIG_IGN);
	if (lfd < 0)
		die("socket");
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(lfd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("bind");
	if (listen(lfd, 1024) < 0)
		die("listen");
	fprintf(stderr, "rr: listening on port %d\n", port);
	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		char kind;

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			die("accept");
		}
		nodelay(fd);
		if (full_read(fd, &kind, 1) != 1) {
			close(fd);
			continue;
		}
		if (kind == 'C') {
			(void)!write(fd, "C", 1);
			close(fd); /* the server closes first: TIME_WAIT stays here */
			continue;
		}
		if (kind == 'R' || kind == 'S') {
			pid_t pid = fork();

			if (pid == 0) {
				close(lfd);
				if (kind == 'R')
					serve_echo(fd);
				serve_sink(fd);
			}
		}
		close(fd);
	}
	return 0;
}

/* -- client --------------------------------------------------------------------------- */

static struct sockaddr_storage target;
static socklen_t target_len;

static void resolve(const char *host, int port)
{
	struct sockaddr_in *v4 = (struct sockaddr_in *)&target;
	struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&target;

	memset(&target, 0, sizeof(target));
	if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
		v4->sin_family = AF_INET;
		v4->sin_port = htons(port);
		target_len = sizeof(*v4);
	} else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
		v6->sin6_family = AF_INET6;
		v6->sin6_port = htons(port);
		target_len = sizeof(*v6);
	} else {
		fprintf(stderr, "rr: %s is not an IPv4 or IPv6 address\n", host);
		exit(2);
	}
}

static int dial(void)
{
	int fd = socket(target.ss_family, SOCK_STREAM, 0);

	if (fd < 0)
		die("socket");
	nodelay(fd);
	if (connect(fd, (struct sockaddr *)&target, target_len) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static void record(double seconds)
{
	double us = seconds * 1e6;
	long b = (long)(us * 10.0);

	if (us > max_us)
		max_us = us;
	hist[b < BUCKETS ? b : BUCKETS]++;
}

static double percentile(uint64_t total, double p)
{
	uint64_t want = (uint64_t)(p * total), seen = 0;

	if (want >= total)
		want = total - 1;
	for (long b = 0; b <= BUCKETS; b++) {
		seen += hist[b];
		if (seen > want)
			return b == BUCKETS ? max_us : (b + 0.5) / 10.0;
	}
	return max_us;
}

/* One rr transaction on `fd` (1 if ok). */
static int rr_once(int fd, char c)
{
	char b;

	if (write(fd, &c, 1) != 1)
		return 0;
	return full_read(fd, &b, 1) == 1;
}

/* One crr transaction (1 if ok). */
static int crr_once(void)
{
	char b;
	int fd = dial(), ok;

	if (fd < 0)
		return 0;
	ok = write(fd, "C", 1) == 1 && full_read(fd, &b, 1) == 1;
	if (ok)
		ok = read(fd, &b, 1) == 0; /* the server's FIN */
	close(fd);
	return ok;
}

static int client(const char *mode, double seconds, double warmup)
{
	uint64_t count = 0, errors = 0, total = 0;
	double start, end, t0, t1, mean;
	int fd = -1;

	signal(SIGPIPE, SIG_IGN);
	if (!strcmp(mode, "rr") || !strcmp(mode, "stream")) {
		fd = dial();
		if (fd < 0)
			die("connect");
	}
	if (!strcmp(mode, "stream")) {
		static char buf[STREAM_CHUNK];
		uint64_t bytes = 0, acked = 0;

		memset(buf, 'x', sizeof(buf));
		if (write(fd, "S", 1) != 1)
			die("write");
		start = now();
		end = start + warmup + seconds;
		for (t1 = start; t1 < end; t1 = now()) {
			ssize_t n = write(fd, buf, sizeof(buf));

			if (n < 0) {
				if (errno == EINTR)
					continue;
				die("write");
			}
			if (t1 >= start + warmup)
				bytes += n;
		}
		shutdown(fd, SHUT_WR);
		(void)!full_read(fd, (char *)&acked, sizeof(acked));
		printf("{\"mode\": \"stream\", \"seconds\": %.6f, \"bytes\": %llu, \"gbit_s\": %.4f, \"received\": %llu}\n",
		       seconds, (unsigned long long)bytes, bytes * 8 / seconds / 1e9, (unsigned long long)acked);
		close(fd);
		return 0;
	}
	if (!strcmp(mode, "rr") && !rr_once(fd, 'R'))
		die("first transaction");
	start = now();
	t1 = start;
	end = start + warmup;
	while (t1 < end) { /* warm-up: not counted */
		int ok = !strcmp(mode, "rr") ? rr_once(fd, 'r') : crr_once();

		if (!ok && fd >= 0)
			die("transaction");
		t1 = now();
	}
	start = t1;
	end = start + seconds;
	while (t1 < end) {
		int ok;

		t0 = t1;
		ok = !strcmp(mode, "rr") ? rr_once(fd, 'r') : crr_once();
		t1 = now();
		if (!ok) {
			errors++;
			if (fd >= 0)
				die("transaction");
			continue;
		}
		record(t1 - t0);
		count++;
	}
	total = count;
	mean = count ? (t1 - start) * 1e6 / count : 0;
	if (fd >= 0)
		close(fd);
	if (!count) {
		printf("{\"mode\": \"%s\", \"seconds\": %.6f, \"transactions\": 0, \"errors\": %llu}\n", mode,
		       t1 - start, (unsigned long long)errors);
		return 1;
	}
	printf("{\"mode\": \"%s\", \"seconds\": %.6f, \"transactions\": %llu, \"errors\": %llu, \"tps\": %.1f, "
	       "\"lat_us\": {\"mean\": %.2f, \"p50\": %.2f, \"p90\": %.2f, \"p99\": %.2f, \"max\": %.2f}}\n",
	       mode, t1 - start, (unsigned long long)count, (unsigned long long)errors, count / (t1 - start), mean,
	       percentile(total, 0.50), percentile(total, 0.90), percentile(total, 0.99), max_us);
	return 0;
}

int main(int argc, char **argv)
{
	const char *host = NULL, *mode = "rr";
	double seconds = 3.0, warmup = 0.5;
	int port = 5201, cpu = -1, is_server = 0, opt;

	while ((opt = getopt(argc, argv, "sc:p:m:t:w:C:h")) != -1) {
		switch (opt) {
		case 's': is_server = 1; break;
		case 'c': host = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'm': mode = optarg; break;
		case 't': seconds = atof(optarg); break;
		case 'w': warmup = atof(optarg); break;
		case 'C': cpu = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: rr -s [-p PORT] [-C CPU]\n"
					"       rr -c ADDR [-p PORT] [-m rr|crr|stream] [-t S] [-w S] [-C CPU]\n");
			return 2;
		}
	}
	if (is_server)
		return server(port, cpu);
	if (!host || (strcmp(mode, "rr") && strcmp(mode, "crr") && strcmp(mode, "stream")) || seconds <= 0) {
		fprintf(stderr, "rr: give -s, or -c ADDR with -m rr|crr|stream and -t > 0\n");
		return 2;
	}
	resolve(host, port);
	pin(cpu);
	return client(mode, seconds, warmup);
}
