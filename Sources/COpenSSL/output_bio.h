#ifndef COPENSSL_OUTPUT_BIO_H
#define COPENSSL_OUTPUT_BIO_H

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include "byte_queue.h"

// A TLS connection's output BIO: OpenSSL writes records into a byte queue
// (`byte_queue.h`), and the worker moves them into its small send buffers with
// `COpenSSL_bytes_take`. A write never asks OpenSSL to retry; the worker stops encrypting
// while the queue holds more than its high water instead.

/// Above this, a queue that empties gives its buffer back (after a bulk burst); below, it
/// keeps it for the next records (keep-alive traffic).
static const size_t COpenSSL_output_kept_capacity = 4096;

/// The most a queue holds: the worker encrypts while it holds less than two full records
/// (`Worker.outputHighWater`), and one more record may follow.
static const size_t COpenSSL_output_burst_capacity = 3 * (16384 + 64);

static inline int COpenSSL_output_write(BIO *bio, const char *bytes, int length) {
    BIO_clear_retry_flags(bio);
    if (length <= 0) return 0;
    return COpenSSL_bytes_append(BIO_get_data(bio), bytes, (size_t)length, COpenSSL_output_burst_capacity) ? length : -1;
}

static inline long COpenSSL_output_ctrl(BIO *bio, int command, long number, void *pointer) {
    (void)number;
    (void)pointer;
    COpenSSL_Bytes *queue = BIO_get_data(bio);
    switch (command) {
    case BIO_CTRL_PENDING:
    case BIO_CTRL_WPENDING:
        return (long)COpenSSL_bytes_pending(queue);
    case BIO_CTRL_FLUSH:
        return 1;
    default:
        return 0;
    }
}

static inline int COpenSSL_output_create(BIO *bio) {
    COpenSSL_Bytes *queue = OPENSSL_zalloc(sizeof *queue);
    if (queue == NULL) return 0;
    BIO_set_data(bio, queue);
    BIO_set_init(bio, 1);
    return 1;
}

static inline int COpenSSL_output_destroy(BIO *bio) {
    COpenSSL_Bytes *queue = BIO_get_data(bio);
    if (queue != NULL) {
        OPENSSL_free(queue->data);
        OPENSSL_free(queue);
        BIO_set_data(bio, NULL);
    }
    return 1;
}

/// The method every output BIO uses; made once (Swift keeps it in a global).
static inline BIO_METHOD *COpenSSL_output_method_new(void) {
    return COpenSSL_bio_method_new("l4lb ciphertext queue", NULL, COpenSSL_output_write, COpenSSL_output_ctrl,
                                   COpenSSL_output_create, COpenSSL_output_destroy);
}

/// The queue an output BIO writes into.
static inline COpenSSL_Bytes *COpenSSL_output_queue(BIO *bio) { return BIO_get_data(bio); }

/// Moves up to `length` bytes of ciphertext to `out`; returns how many. A queue that grew
/// past `COpenSSL_output_kept_capacity` is freed once it empties.
static inline size_t COpenSSL_output_take(COpenSSL_Bytes *queue, void *out, size_t length) {
    size_t count = COpenSSL_bytes_take(queue, out, length);
    if (queue->capacity > COpenSSL_output_kept_capacity) COpenSSL_bytes_release(queue);
    return count;
}

#endif
