#ifndef COPENSSL_BYTE_QUEUE_H
#define COPENSSL_BYTE_QUEUE_H

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <string.h>

// Bytes a TLS connection's BIOs hold between the worker and OpenSSL: one buffer, read from
// `start`, written at `end`. A memory BIO would do, but each of its calls goes through
// BIO_ctrl into three separately allocated structures, and under keep-alive load (many
// connections, one small record each way per request) those cold cache lines cost more
// than the record's cryptography. The worker reads `end - start` straight from here.

typedef struct COpenSSL_Bytes {
    unsigned char *data;
    size_t capacity;
    size_t start;
    size_t end;
} COpenSSL_Bytes;

static inline size_t COpenSSL_bytes_pending(const COpenSSL_Bytes *queue) { return queue->end - queue->start; }

/// Appends `length` bytes, moving what is held to the front or growing the buffer when
/// the tail has no room: to twice its size, or to `burst` once more than 4 KiB is held
/// (the most its owner lets it hold, so a stream grows it once). Returns 0 when memory
/// ran out (nothing is appended then).
static inline int COpenSSL_bytes_append(COpenSSL_Bytes *queue, const void *bytes, size_t length, size_t burst) {
    if (length == 0) return 1;
    size_t held = queue->end - queue->start;
    if (queue->capacity - queue->end < length) {
        if (held + length <= queue->capacity) {
            memmove(queue->data, queue->data + queue->start, held);
        } else {
            size_t capacity = queue->capacity * 2;
            if (capacity < held + length) capacity = held + length;
            if (capacity < 1024) capacity = 1024;
            if (held + length > 4096 && capacity < burst) capacity = burst;
            unsigned char *data = OPENSSL_malloc(capacity);
            if (data == NULL) return 0;
            if (held > 0) memcpy(data, queue->data + queue->start, held);
            OPENSSL_free(queue->data);
            queue->data = data;
            queue->capacity = capacity;
        }
        queue->start = 0;
        queue->end = held;
    }
    memcpy(queue->data + queue->end, bytes, length);
    queue->end += length;
    return 1;
}

/// Moves up to `length` bytes to `out`; returns how many.
static inline size_t COpenSSL_bytes_take(COpenSSL_Bytes *queue, void *out, size_t length) {
    size_t held = queue->end - queue->start;
    if (length > held) length = held;
    if (length == 0) return 0;  // `data` may be NULL then
    memcpy(out, queue->data + queue->start, length);
    queue->start += length;
    if (queue->start == queue->end) queue->start = queue->end = 0;
    return length;
}

static inline void COpenSSL_bytes_clear(COpenSSL_Bytes *queue) { queue->start = queue->end = 0; }

/// Frees the buffer if it holds nothing. Returns 1 when nothing is held afterwards.
static inline int COpenSSL_bytes_release(COpenSSL_Bytes *queue) {
    if (queue->end > queue->start) return 0;
    OPENSSL_free(queue->data);
    queue->data = NULL;
    queue->capacity = queue->start = queue->end = 0;
    return 1;
}

/// A source/sink BIO method over the given callbacks (either of `read` and `write` may be
/// NULL), as both TLS BIOs are made. NULL when OpenSSL is out of memory.
static inline BIO_METHOD *COpenSSL_bio_method_new(const char *name, int (*read)(BIO *, char *, int),
                                                  int (*write)(BIO *, const char *, int),
                                                  long (*ctrl)(BIO *, int, long, void *), int (*create)(BIO *),
                                                  int (*destroy)(BIO *)) {
    BIO_METHOD *method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, name);
    if (method == NULL) return NULL;
    if ((read != NULL && !BIO_meth_set_read(method, read)) || (write != NULL && !BIO_meth_set_write(method, write)) ||
        !BIO_meth_set_ctrl(method, ctrl) || !BIO_meth_set_create(method, create) || !BIO_meth_set_destroy(method, destroy)) {
        BIO_meth_free(method);
        return NULL;
    }
    return method;
}

#endif
