/* Small-packet UDP load for bench/routed.py (issue 35, must-show 7): a paced sender over
 * many flows and a counting sink. Bounded by its duration; nothing here runs unbounded.
 *
 *   udp_blast send HOST PORT FLOWS RATE SECONDS SIZE   FLOWS sockets (one source port each,
 *       connected to HOST:PORT) send SIZE-byte datagrams round-robin at RATE a second in all,
 *       for SECONDS; prints "sent N".
 *   udp_blast sink HOST PORT SECONDS                    counts the datagrams arriving on
 *       HOST:PORT for SECONDS; prints "received N".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static struct sockaddr_in address(const char *host, int port)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
		fprintf(stderr, "bad address %s\n", host);
		exit(2);
	}
	return a;
}

static int sink(const char *host, int port, double seconds)
{
	struct sockaddr_in a = address(host, port);
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	int size = 8 << 20;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
		perror("bind");
		return 1;
	}
	struct timeval tick = {.tv_sec = 0, .tv_usec = 100000};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tick, sizeof(tick));
	static char buffers[BATCH][2048];
	struct mmsghdr messages[BATCH];
	struct iovec vectors[BATCH];
	unsigned long long received = 0;
	double end = now() + seconds;
	while (now() < end) {
		for (int i = 0; i < BATCH; i++) {
			vectors[i] = (struct iovec){buffers[i], sizeof(buffers[i])};
			messages[i] = (struct mmsghdr){.msg_hdr = {.msg_iov = &vectors[i], .msg_iovlen = 1}};
		}
		int n = recvmmsg(fd, messages, BATCH, 0, NULL);
		if (n > 0)
			received += n;
	}
	printf("received %llu\n", received);
	return 0;
}

static int send_flows(const char *host, int port, int flows, double rate, double seconds, int size)
{
	struct sockaddr_in a = address(host, port);
	int *fds = calloc(flows, sizeof(int));
	for (int i = 0; i < flows; i++) {
		fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
		if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)&a, sizeof(a)) != 0) {
			perror("socket/connect");
			return 1;
		}
	}
	static char payload[65536];
	memset(payload, 'x', sizeof(payload));
	struct mmsghdr messages[BATCH];
	struct iovec vector = {payload, (size_t)size};
	for (int i = 0; i < BATCH; i++)
		messages[i] = (struct mmsghdr){.msg_hdr = {.msg_iov = &vector, .msg_iovlen = 1}};
	unsigned long long sent = 0;
	double start = now(), end = start + seconds;
	int flow = 0;
	for (double t = start; t < end; t = now()) {
		/* Paced: never ahead of RATE × elapsed; a batch to one flow at a time. */
		double due = (t - start) * rate;
		if (sent + BATCH > due) {
			struct timespec pause = {0, 200000};
			nanosleep(&pause, NULL);
			continue;
		}
		int n = sendmmsg(fds[flow], messages, BATCH, 0);
		if (n > 0)
			sent += n;
		else if (errno != EAGAIN && errno != ENOBUFS && errno != ECONNREFUSED)
			perror("sendmmsg");
		flow = (flow + 1) % flows;
	}
	printf("sent %llu\n", sent);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 8 && strcmp(argv[1], "send") == 0)
		return send_flows(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]), atof(argv[6]), atoi(argv[7]));
	if (argc == 5 && strcmp(argv[1], "sink") == 0)
		return sink(argv[2], atoi(argv[3]), atof(argv[4]));
	fprintf(stderr, "usage: udp_blast send HOST PORT FLOWS RATE SECONDS SIZE | sink HOST PORT SECONDS\n");
	return 2;
}
