#ifndef COPENSSL_INPUT_BIO_H
#define COPENSSL_INPUT_BIO_H

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <string.h>
#include "byte_queue.h"

// A TLS connection's input BIO. During a bulk stream OpenSSL reads the peer's ciphertext
// straight out of the worker's large receive buffer (`lent`), which the worker keeps until
// it is read. Every other receive (the handshake, small reads, bytes that come while the
// other side is busy) is copied into `kept` (`byte_queue.h`), which is read first. A
// memory BIO for the bulk reads would copy each megabyte and zero the room it grows into
// first.

typedef struct COpenSSL_Input {
    const unsigned char *lent;
    size_t lent_length;
    COpenSSL_Bytes kept;
} COpenSSL_Input;

/// What the BIO holds for OpenSSL to read: lent and kept bytes.
static inline size_t COpenSSL_input_pending(const COpenSSL_Input *input) {
    return input->lent_length + COpenSSL_bytes_pending(&input->kept);
}

static inline int COpenSSL_input_read(BIO *bio, char *out, int length) {
    COpenSSL_Input *input = BIO_get_data(bio);
    BIO_clear_retry_flags(bio);
    if (length <= 0) return 0;
    int count = (int)COpenSSL_bytes_take(&input->kept, out, (size_t)length);
    if (count < length && input->lent_length > 0) {
        size_t n = (size_t)(length - count);
        if (n > input->lent_length) n = input->lent_length;
        memcpy(out + count, input->lent, n);
        input->lent += n;
        input->lent_length -= n;
        count += (int)n;
    }
    if (count == 0) {
        // Nothing yet: "try again", never EOF (the socket's EOF comes as a receive of 0).
        BIO_set_retry_read(bio);
        return -1;
    }
    return count;
}

static inline long COpenSSL_input_ctrl(BIO *bio, int command, long number, void *pointer) {
    (void)number;
    (void)pointer;
    COpenSSL_Input *input = BIO_get_data(bio);
    switch (command) {
    case BIO_CTRL_PENDING:
        return (long)COpenSSL_input_pending(input);
    case BIO_CTRL_FLUSH:
        return 1;
    default:
        return 0;
    }
}

static inline int COpenSSL_input_create(BIO *bio) {
    COpenSSL_Input *input = OPENSSL_zalloc(sizeof *input);
    if (input == NULL) return 0;
    BIO_set_data(bio, input);
    BIO_set_init(bio, 1);
    return 1;
}

static inline int COpenSSL_input_destroy(BIO *bio) {
    COpenSSL_Input *input = BIO_get_data(bio);
    if (input != NULL) {
        OPENSSL_free(input->kept.data);
        OPENSSL_free(input);
        BIO_set_data(bio, NULL);
    }
    return 1;
}

/// The method every input BIO uses; made once (Swift keeps it in a global).
static inline BIO_METHOD *COpenSSL_input_method_new(void) {
    return COpenSSL_bio_method_new("l4lb receive buffer", COpenSSL_input_read, NULL, COpenSSL_input_ctrl,
                                   COpenSSL_input_create, COpenSSL_input_destroy);
}

/// The state an input BIO reads from (the worker asks it what is pending).
static inline COpenSSL_Input *COpenSSL_input_state(BIO *bio) { return BIO_get_data(bio); }

/// Copies `length` bytes at `bytes` into the BIO, after what is lent (which is copied
/// first: its buffer is about to be reused). Returns 0 when memory ran out.
static inline int COpenSSL_input_append(COpenSSL_Input *input, const void *bytes, size_t length) {
    const unsigned char *lent = input->lent;
    size_t lent_length = input->lent_length;
    input->lent = NULL;
    input->lent_length = 0;
    return COpenSSL_bytes_append(&input->kept, lent, lent_length, 0) && COpenSSL_bytes_append(&input->kept, bytes, length, 0);
}

/// Lends `length` bytes at `bytes`, which stay where they are until read. Only when the
/// BIO is empty (else the bytes would be read out of order).
static inline int COpenSSL_input_lend(COpenSSL_Input *input, const void *bytes, size_t length) {
    if (COpenSSL_input_pending(input) > 0) return 0;
    input->lent = bytes;
    input->lent_length = length;
    return 1;
}

/// Forgets what is lent without reading it (after close_notify or an error, or when the
/// connection closes).
static inline void COpenSSL_input_forget(COpenSSL_Input *input) {
    input->lent = NULL;
    input->lent_length = 0;
}

/// Frees `kept` once it is empty, so a burst it held is not held for longer. Returns 1
/// when nothing is kept afterwards, 0 when `kept` still holds bytes.
static inline int COpenSSL_input_release_kept(COpenSSL_Input *input) {
    return COpenSSL_bytes_release(&input->kept);
}

#endif
