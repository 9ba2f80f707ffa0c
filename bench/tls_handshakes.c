/*
 * A load generator of full TLS 1.3 handshakes that costs the client far less than the
 * server, so the proxy, not the client, sets the rate on a machine with one load CPU.
 *
 * openssl s_time and wrk spend 0.6-1 ms of CPU per full handshake in OpenSSL 3.0's libssl
 * (certificate decoding, algorithm fetches, allocation), more than the proxy they measure.
 * This client speaks just enough TLS 1.3 itself (RFC 8446: one cipher suite,
 * TLS_AES_128_GCM_SHA256, one group, X25519, no PSK) on top of libcrypto's primitives.
 * Each connection is a full handshake from the server's side: a fresh server key share,
 * a certificate and a CertificateVerify signature, a Finished. The client checks the
 * server's Finished (so a handshake that went wrong is counted as an error), but not the
 * certificate or its signature: it is load, not a TLS client to trust. It then sends one
 * HTTP/1.0 request, reads the answer to the end and closes.
 *
 * Usage: tls_handshakes PORT SECONDS THREADS  ->  one line of JSON on stdout.
 * Each thread runs one connection after another (blocking sockets); threads overlap.
 */
#define _GNU_SOURCE
#define OPENSSL_SUPPRESS_DEPRECATED
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int port;
static double deadline;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* ---- SHA-256, HMAC, HKDF (RFC 5869, RFC 8446 §7.1) ---- */

static void hmac(const uint8_t *key, size_t keylen, const uint8_t *msg, size_t len, uint8_t out[32]) {
    uint8_t k[64] = {0}, pad[64];
    if (keylen > 64) SHA256(key, keylen, k); else memcpy(k, key, keylen);
    SHA256_CTX c;
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x36;
    SHA256_Init(&c); SHA256_Update(&c, pad, 64); SHA256_Update(&c, msg, len); SHA256_Final(out, &c);
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x5c;
    SHA256_Init(&c); SHA256_Update(&c, pad, 64); SHA256_Update(&c, out, 32); SHA256_Final(out, &c);
}

/* HKDF-Expand-Label(secret, label, context, length) for length <= 32. */
static void expand_label(const uint8_t secret[32], const char *label, const uint8_t *ctx, size_t ctxlen, uint8_t *out, size_t len) {
    uint8_t info[128], t[32];
    size_t n = 0, l = strlen(label);
    info[n++] = 0; info[n++] = (uint8_t)len;
    info[n++] = (uint8_t)(6 + l);
    memcpy(info + n, "tls13 ", 6); n += 6;
    memcpy(info + n, label, l); n += l;
    info[n++] = (uint8_t)ctxlen;
    memcpy(info + n, ctx, ctxlen); n += ctxlen;
    info[n++] = 1;
    hmac(secret, 32, info, n, t);
    memcpy(out, t, len);
}

static void derive_secret(const uint8_t secret[32], const char *label, const SHA256_CTX *transcript, uint8_t out[32]) {
    uint8_t h[32];
    SHA256_CTX c = *transcript;
    SHA256_Final(h, &c);
    expand_label(secret, label, h, 32, out, 32);
}

/* ---- records ---- */

typedef struct {
    int fd;
    uint8_t in[18000];
    size_t have;           /* bytes in `in` */
    EVP_CIPHER_CTX *aead;
    uint8_t rkey[16], riv[12], wkey[16], wiv[12];
    uint64_t rseq, wseq;
} conn;

static int send_all(int fd, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) { if (w < 0 && errno == EINTR) continue; return -1; }
        p += w; n -= (size_t)w;
    }
    return 0;
}

/* The next whole record: its type, and its body in `body` (at most 16 KiB + overhead).
   Returns the body length, 0 at EOF before a record, -1 on error. */
static int read_record(conn *c, uint8_t *type, uint8_t *body) {
    for (;;) {
        if (c->have >= 5) {
            size_t len = (size_t)c->in[3] << 8 | c->in[4];
            if (len > 16384 + 256) return -1;
            if (c->have >= 5 + len) {
                *type = c->in[0];
                memcpy(body, c->in + 5, len);
                memmove(c->in, c->in + 5 + len, c->have - 5 - len);
                c->have -= 5 + len;
                return (int)len;
            }
        }
        ssize_t r = recv(c->fd, c->in + c->have, sizeof c->in - c->have, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return c->have == 0 && r == 0 ? 0 : -1;
        c->have += (size_t)r;
    }
}

static void nonce(const uint8_t iv[12], uint64_t seq, uint8_t out[12]) {
    memcpy(out, iv, 12);
    for (int i = 0; i < 8; i++) out[11 - i] ^= (uint8_t)(seq >> (8 * i));
}

/* Decrypts a TLSCiphertext body in place; returns the inner length and its content type. */
static int open_record(conn *c, uint8_t *body, int len, uint8_t *inner_type) {
    if (len < 17) return -1;
    uint8_t aad[5] = {23, 3, 3, (uint8_t)(len >> 8), (uint8_t)len}, n[12];
    nonce(c->riv, c->rseq++, n);
    int out = 0, fin = 0, plain = len - 16;
    if (!EVP_DecryptInit_ex(c->aead, NULL, NULL, c->rkey, n)) return -1;
    if (!EVP_DecryptUpdate(c->aead, NULL, &out, aad, 5)) return -1;
    if (!EVP_DecryptUpdate(c->aead, body, &out, body, plain)) return -1;
    if (!EVP_CIPHER_CTX_ctrl(c->aead, EVP_CTRL_GCM_SET_TAG, 16, body + plain)) return -1;
    if (EVP_DecryptFinal_ex(c->aead, body + out, &fin) <= 0) return -1;
    while (plain > 0 && body[plain - 1] == 0) plain--;
    if (plain == 0) return -1;
    *inner_type = body[plain - 1];
    return plain - 1;
}

static int seal_and_send(conn *c, uint8_t type, const uint8_t *data, size_t len) {
    uint8_t rec[5 + 512 + 1 + 16], n[12];
    size_t body = len + 1 + 16;
    if (len > 512) return -1;
    rec[0] = 23; rec[1] = 3; rec[2] = 3; rec[3] = (uint8_t)(body >> 8); rec[4] = (uint8_t)body;
    memcpy(rec + 5, data, len);
    rec[5 + len] = type;
    nonce(c->wiv, c->wseq++, n);
    int out = 0, fin = 0;
    if (!EVP_EncryptInit_ex(c->aead, NULL, NULL, c->wkey, n)) return -1;
    if (!EVP_EncryptUpdate(c->aead, NULL, &out, rec, 5)) return -1;
    if (!EVP_EncryptUpdate(c->aead, rec + 5, &out, rec + 5, (int)len + 1)) return -1;
    if (!EVP_EncryptFinal_ex(c->aead, rec + 5 + out, &fin)) return -1;
    if (!EVP_CIPHER_CTX_ctrl(c->aead, EVP_CTRL_GCM_GET_TAG, 16, rec + 5 + len + 1)) return -1;
    return send_all(c->fd, rec, 5 + body);
}

static void traffic_keys(const uint8_t secret[32], uint8_t key[16], uint8_t iv[12]) {
    expand_label(secret, "key", NULL, 0, key, 16);
    expand_label(secret, "iv", NULL, 0, iv, 12);
}

/* ---- one connection ---- */

typedef struct { long handshakes, errors; } counts;

/* 0: a full handshake and an answer; -1: any failure. */
static int one_connection(conn *c, EVP_PKEY *mine, const uint8_t my_public[32], uint8_t *body) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(0x7f000001);
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1, result = -1;
    if (fd < 0) return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* A stalled connection is an error, not a hung run. */
    struct timeval limit = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
    c->fd = fd; c->have = 0; c->rseq = c->wseq = 0;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) goto out;

    /* ClientHello: TLS_AES_128_GCM_SHA256, X25519, no session id, no PSK. */
    uint8_t hello[256];
    size_t n = 0;
    hello[n++] = 22; hello[n++] = 3; hello[n++] = 1; n += 2;                 /* record */
    size_t msg = n;
    hello[n++] = 1; n += 3;                                                  /* ClientHello */
    hello[n++] = 3; hello[n++] = 3;
    RAND_bytes(hello + n, 32); n += 32;
    hello[n++] = 0;                                                          /* session id */
    hello[n++] = 0; hello[n++] = 2; hello[n++] = 0x13; hello[n++] = 0x01;    /* suites */
    hello[n++] = 1; hello[n++] = 0;                                          /* compression */
    size_t ext = n; n += 2;
    static const uint8_t fixed[] = {
        0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04,                            /* supported_versions */
        0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d,                      /* supported_groups */
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, /* signature_algorithms */
        0x00, 0x33, 0x00, 0x26, 0x00, 0x24, 0x00, 0x1d, 0x00, 0x20,          /* key_share: x25519 */
    };
    memcpy(hello + n, fixed, sizeof fixed); n += sizeof fixed;
    memcpy(hello + n, my_public, 32); n += 32;
    size_t extlen = n - ext - 2, msglen = n - msg - 4, reclen = n - 5;
    hello[ext] = (uint8_t)(extlen >> 8); hello[ext + 1] = (uint8_t)extlen;
    hello[msg + 1] = 0; hello[msg + 2] = (uint8_t)(msglen >> 8); hello[msg + 3] = (uint8_t)msglen;
    hello[3] = (uint8_t)(reclen >> 8); hello[4] = (uint8_t)reclen;
    if (send_all(fd, hello, n) < 0) goto out;
    SHA256_CTX transcript;
    SHA256_Init(&transcript);
    SHA256_Update(&transcript, hello + msg, n - msg);

    /* ServerHello, in the clear. */
    uint8_t type;
    int len = read_record(c, &type, body);
    if (len < 4 || type != 22 || body[0] != 2) goto out;
    size_t shlen = (size_t)body[1] << 16 | (size_t)body[2] << 8 | body[3];
    if (4 + shlen > (size_t)len) goto out;
    SHA256_Update(&transcript, body, 4 + shlen);
    /* version(2) random(32) session_id(1+k) suite(2) compression(1) extensions */
    size_t p = 4 + 2 + 32;
    p += 1 + body[p];
    if (p + 5 > 4 + shlen || body[p] != 0x13 || body[p + 1] != 0x01) goto out;
    p += 3;
    size_t end = p + 2 + ((size_t)body[p] << 8 | body[p + 1]);
    p += 2;
    const uint8_t *peer = NULL;
    while (p + 4 <= end && end <= 4 + shlen) {
        unsigned et = body[p] << 8 | body[p + 1], el = body[p + 2] << 8 | body[p + 3];
        if (et == 0x33 && el == 36 && body[p + 4] == 0 && body[p + 5] == 0x1d) peer = body + p + 8;
        p += 4 + el;
    }
    if (!peer) goto out;

    uint8_t shared[32], zero[32] = {0}, secret[32], derived[32], hs[32], c_hs[32], s_hs[32];
    size_t slen = 32;
    EVP_PKEY *theirs = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, peer, 32);
    EVP_PKEY_CTX *dctx = theirs ? EVP_PKEY_CTX_new(mine, NULL) : NULL;
    int derived_ok = dctx && EVP_PKEY_derive_init(dctx) > 0 && EVP_PKEY_derive_set_peer(dctx, theirs) > 0
                     && EVP_PKEY_derive(dctx, shared, &slen) > 0;
    EVP_PKEY_CTX_free(dctx);
    EVP_PKEY_free(theirs);
    if (!derived_ok) goto out;
    SHA256_CTX empty;
    SHA256_Init(&empty);
    hmac(zero, 32, zero, 32, secret);                    /* early secret */
    derive_secret(secret, "derived", &empty, derived);
    hmac(derived, 32, shared, 32, hs);                   /* handshake secret */
    derive_secret(hs, "c hs traffic", &transcript, c_hs);
    derive_secret(hs, "s hs traffic", &transcript, s_hs);
    traffic_keys(s_hs, c->rkey, c->riv);
    traffic_keys(c_hs, c->wkey, c->wiv);

    /* EncryptedExtensions, Certificate, CertificateVerify, Finished. */
    static __thread uint8_t hbuf[20000];
    size_t hlen = 0;
    int finished = 0;
    while (!finished) {
        len = read_record(c, &type, body);
        if (len <= 0) goto out;
        if (type == 20) continue;                        /* change_cipher_spec */
        if (type != 23) goto out;
        uint8_t inner;
        int plain = open_record(c, body, len, &inner);
        if (plain < 0 || inner != 22 || hlen + (size_t)plain > sizeof hbuf) goto out;
        memcpy(hbuf + hlen, body, (size_t)plain);
        hlen += (size_t)plain;
        size_t q = 0;
        while (q + 4 <= hlen) {
            size_t ml = (size_t)hbuf[q + 1] << 16 | (size_t)hbuf[q + 2] << 8 | hbuf[q + 3];
            if (q + 4 + ml > hlen) break;
            if (hbuf[q] == 20) {
                uint8_t fkey[32], h[32], expect[32];
                SHA256_CTX t = transcript;
                SHA256_Final(h, &t);
                expand_label(s_hs, "finished", NULL, 0, fkey, 32);
                hmac(fkey, 32, h, 32, expect);
                if (ml != 32 || memcmp(expect, hbuf + q + 4, 32) != 0) goto out;
                finished = 1;
            }
            SHA256_Update(&transcript, hbuf + q, 4 + ml);
            q += 4 + ml;
            if (finished) break;
        }
        memmove(hbuf, hbuf + q, hlen - q);
        hlen -= q;
    }

    /* Application secrets from the transcript through the server's Finished. */
    uint8_t master[32], c_ap[32], s_ap[32];
    derive_secret(hs, "derived", &empty, derived);
    hmac(derived, 32, zero, 32, master);
    derive_secret(master, "c ap traffic", &transcript, c_ap);
    derive_secret(master, "s ap traffic", &transcript, s_ap);

    /* Our Finished, then the request. */
    uint8_t fin[36] = {20, 0, 0, 32}, fkey[32], h[32];
    SHA256_CTX t = transcript;
    SHA256_Final(h, &t);
    expand_label(c_hs, "finished", NULL, 0, fkey, 32);
    hmac(fkey, 32, h, 32, fin + 4);
    if (seal_and_send(c, 22, fin, sizeof fin) < 0) goto out;
    traffic_keys(c_ap, c->wkey, c->wiv);
    traffic_keys(s_ap, c->rkey, c->riv);
    c->wseq = c->rseq = 0;
    static const char request[] = "GET / HTTP/1.0\r\n\r\n";
    if (seal_and_send(c, 23, (const uint8_t *)request, sizeof request - 1) < 0) goto out;

    /* Tickets (ignored), the answer, then close_notify or EOF. */
    long answered = 0;
    for (;;) {
        len = read_record(c, &type, body);
        if (len == 0) break;
        if (len < 0 || type != 23) goto out;
        uint8_t inner;
        int plain = open_record(c, body, len, &inner);
        if (plain < 0) goto out;
        if (inner == 23) answered += plain;
        else if (inner == 21) break;
    }
    if (answered > 0) result = 0;
out:
    close(fd);
    return result;
}

static void *worker(void *arg) {
    counts *k = arg;
    conn *c = calloc(1, sizeof *c);
    uint8_t *body = malloc(16384 + 512);
    c->aead = EVP_CIPHER_CTX_new();
    EVP_CIPHER *gcm = EVP_CIPHER_fetch(NULL, "AES-128-GCM", NULL);
    static const uint8_t k0[16], iv0[12];
    EVP_EncryptInit_ex(c->aead, gcm, NULL, k0, iv0);
    /* One key pair per thread: the server's work per handshake is the same whatever
       share the client sends, and the client saves a key generation. */
    EVP_PKEY *mine = EVP_PKEY_Q_keygen(NULL, NULL, "X25519");
    uint8_t pub[32];
    size_t publen = 32;
    EVP_PKEY_get_raw_public_key(mine, pub, &publen);
    while (now() < deadline) {
        if (one_connection(c, mine, pub, body) == 0) k->handshakes++; else k->errors++;
    }
    EVP_PKEY_free(mine);
    EVP_CIPHER_free(gcm);
    EVP_CIPHER_CTX_free(c->aead);
    free(body);
    free(c);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PORT SECONDS THREADS\n", argv[0]);
        return 2;
    }
    port = atoi(argv[1]);
    double seconds = atof(argv[2]);
    int threads = atoi(argv[3]);
    if (threads < 1 || threads > 256 || seconds <= 0 || seconds > 600) return 2;
    double start = now();
    deadline = start + seconds;
    pthread_t tid[256];
    counts k[256];
    memset(k, 0, sizeof k);
    for (int i = 0; i < threads; i++) pthread_create(&tid[i], NULL, worker, &k[i]);
    long hs = 0, errors = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(tid[i], NULL);
        hs += k[i].handshakes;
        errors += k[i].errors;
    }
    double elapsed = now() - start;
    printf("{\"handshakes\": %ld, \"errors\": %ld, \"seconds\": %.3f}\n", hs, errors, elapsed);
    return 0;
}
