#ifndef COPENSSL_SHIM_H
#define COPENSSL_SHIM_H

// No _GNU_SOURCE here (as in CURing's shim): glibc headers parsed with it define fd_set
// differently from Swift's Glibc module, and the importer rejects the pair. Nothing below
// needs it.
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <openssl/rand.h>
#include <openssl/hmac.h>
#include <openssl/core_names.h>
#include <time.h>
#include <string.h>
#include <strings.h>
#include <stdint.h>
#include <sys/socket.h>
#include <netinet/in.h>

// OpenSSL's function-like macros do not import into Swift; these mirror them, and the
// callbacks below are C so no Swift closure runs inside a handshake.

static inline int COpenSSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version) {
    return (int)SSL_CTX_set_min_proto_version(ctx, version);
}
static inline long COpenSSL_CTX_set_mode(SSL_CTX *ctx, long mode) { return SSL_CTX_set_mode(ctx, mode); }
static inline long COpenSSL_CTX_set_session_cache_mode(SSL_CTX *ctx, long mode) {
    return SSL_CTX_set_session_cache_mode(ctx, mode);
}
static inline long COpenSSL_CTX_sess_set_cache_size(SSL_CTX *ctx, long size) { return SSL_CTX_sess_set_cache_size(ctx, size); }
static inline long COpenSSL_CTX_set_ticket_keys(SSL_CTX *ctx, unsigned char *keys, long length) {
    return SSL_CTX_set_tlsext_ticket_keys(ctx, keys, length);
}
static inline long COpenSSL_CTX_add_extra_chain_cert(SSL_CTX *ctx, X509 *cert) { return SSL_CTX_add_extra_chain_cert(ctx, cert); }
static inline int COpenSSL_set_max_proto_version(SSL *ssl, int version) { return (int)SSL_set_max_proto_version(ssl, version); }
static inline long COpenSSL_set_tlsext_host_name(SSL *ssl, const char *name) { return SSL_set_tlsext_host_name(ssl, name); }

static const long COpenSSL_MODE_PARTIAL_WRITE = SSL_MODE_ENABLE_PARTIAL_WRITE;
static const long COpenSSL_MODE_MOVING_BUFFER = SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER;
static const long COpenSSL_MODE_RELEASE_BUFFERS = SSL_MODE_RELEASE_BUFFERS;
static const long COpenSSL_SESS_CACHE_SERVER = SSL_SESS_CACHE_SERVER;
static const long COpenSSL_SESS_CACHE_CLIENT = SSL_SESS_CACHE_CLIENT;
static const unsigned long long COpenSSL_OP_NO_TICKET = SSL_OP_NO_TICKET;
static const long COpenSSL_OP_NO_RENEGOTIATION = SSL_OP_NO_RENEGOTIATION;
static const long COpenSSL_OP_CIPHER_SERVER_PREFERENCE = SSL_OP_CIPHER_SERVER_PREFERENCE;

/// What a listener's contexts share through their app data: the SNI table (exact and
/// "*.suffix" names → context) and the ALPN protocols in wire format.
typedef struct COpenSSL_ListenerTable {
    int count;
    const char **names;
    SSL_CTX **contexts;
    const unsigned char *alpn;
    unsigned int alpn_length;
    /// Session-ticket keys are derived from `ticket_secret` per period of
    /// `ticket_period` seconds, so every worker (and a restarted l4lb given the same
    /// secret) derives the same ones: a ticket sealed by one worker opens on another.
    /// The previous period's key still opens tickets (and asks for a renewal, as every
    /// TLS 1.3 resumption does).
    unsigned char ticket_secret[32];
    long long ticket_period;
    long long cached_period;
    unsigned char keys[2][80]; // name[16] | hmac[32] | aes[32], for cached_period and the one before
} COpenSSL_ListenerTable;

static inline int COpenSSL_name_matches(const char *pattern, const char *name) {
    if (strcasecmp(pattern, name) == 0) return 1;
    if (pattern[0] == '*' && pattern[1] == '.') {
        // One label only: "*.example.test" matches "a.example.test", not "a.b.example.test".
        const char *dot = strchr(name, '.');
        return dot != NULL && dot != name && strcasecmp(pattern + 1, dot) == 0;
    }
    return 0;
}

/// The context serving `name`: an exact name first, then a wildcard; NULL for none.
static inline SSL_CTX *COpenSSL_table_lookup(const COpenSSL_ListenerTable *table, const char *name) {
    for (int i = 0; i < table->count; i++)
        if (table->names[i][0] != '*' && strcasecmp(table->names[i], name) == 0) return table->contexts[i];
    for (int i = 0; i < table->count; i++)
        if (table->names[i][0] == '*' && COpenSSL_name_matches(table->names[i], name)) return table->contexts[i];
    return NULL;
}

static inline int COpenSSL_servername_callback(SSL *ssl, int *alert, void *arg) {
    (void)alert;
    const COpenSSL_ListenerTable *table = (const COpenSSL_ListenerTable *)arg;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (name == NULL || table == NULL) return SSL_TLSEXT_ERR_NOACK;
    SSL_CTX *ctx = COpenSSL_table_lookup(table, name);
    // No match: the default certificate (the first), as nginx and HAProxy do.
    if (ctx != NULL && ctx != SSL_get_SSL_CTX(ssl)) SSL_set_SSL_CTX(ssl, ctx);
    return SSL_TLSEXT_ERR_OK;
}

static inline int COpenSSL_alpn_callback(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                                         const unsigned char *in, unsigned int inlen, void *arg) {
    (void)ssl;
    const COpenSSL_ListenerTable *table = (const COpenSSL_ListenerTable *)arg;
    if (table == NULL || table->alpn_length == 0) return SSL_TLSEXT_ERR_NOACK;
    unsigned char *selected = NULL;
    // Server preference: the listener's order wins.
    if (SSL_select_next_proto(&selected, outlen, table->alpn, table->alpn_length, in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = selected;
    return SSL_TLSEXT_ERR_OK;
}

static inline void COpenSSL_derive_key(const COpenSSL_ListenerTable *table, long long period, unsigned char out[80]) {
    unsigned char input[9];
    unsigned int length = 0;
    for (int i = 0; i < 8; i++) input[i] = (unsigned char)(period >> (8 * i));
    unsigned char block[32];
    for (int part = 0; part < 3; part++) {
        input[8] = (unsigned char)part;
        HMAC(EVP_sha256(), table->ticket_secret, 32, input, sizeof input, block, &length);
        if (part == 0) memcpy(out, block, 16); else memcpy(out + 16 + 32 * (part - 1), block, 32);
    }
}

static inline void COpenSSL_refresh_keys(COpenSSL_ListenerTable *table) {
    long long period = (long long)time(NULL) / table->ticket_period;
    if (period == table->cached_period) return;
    COpenSSL_derive_key(table, period, table->keys[0]);
    COpenSSL_derive_key(table, period - 1, table->keys[1]);
    table->cached_period = period;
}

static inline int COpenSSL_ticket_callback(SSL *ssl, unsigned char *name, unsigned char *iv, EVP_CIPHER_CTX *cipher,
                                           EVP_MAC_CTX *mac, int encrypt) {
    COpenSSL_ListenerTable *table = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    if (table == NULL || table->ticket_period <= 0) return -1;
    COpenSSL_refresh_keys(table);
    const unsigned char *key = NULL;
    // A ticket opened with the previous period's key is renewed, and so is every TLS 1.3
    // ticket: those are for one use (RFC 8446 §C.4), and a client that keeps only its
    // latest session would otherwise be left holding a spent one and fall back to a full
    // handshake every other connection.
    int renew = !encrypt && SSL_version(ssl) == TLS1_3_VERSION;
    if (encrypt) {
        key = table->keys[0];
        memcpy(name, key, 16);
        if (RAND_bytes(iv, EVP_MAX_IV_LENGTH) != 1) return -1;
    } else if (memcmp(name, table->keys[0], 16) == 0) {
        key = table->keys[0];
    } else if (memcmp(name, table->keys[1], 16) == 0) {
        key = table->keys[1];
        renew = 1;
    } else {
        return 0; // unknown key: a full handshake
    }
    OSSL_PARAM params[3];
    params[0] = OSSL_PARAM_construct_octet_string("key", (void *)(key + 16), 32);
    params[1] = OSSL_PARAM_construct_utf8_string("digest", "SHA256", 0);
    params[2] = OSSL_PARAM_construct_end();
    if (EVP_MAC_CTX_set_params(mac, params) != 1) return -1;
    if (EVP_CipherInit_ex(cipher, EVP_aes_256_cbc(), NULL, key + 48, iv, encrypt) != 1) return -1;
    return encrypt ? 1 : (renew ? 2 : 1);
}

static inline void COpenSSL_install_callbacks(SSL_CTX *ctx, COpenSSL_ListenerTable *table) {
    SSL_CTX_set_tlsext_servername_callback(ctx, COpenSSL_servername_callback);
    SSL_CTX_set_tlsext_servername_arg(ctx, table);
    if (table->alpn_length > 0) SSL_CTX_set_alpn_select_cb(ctx, COpenSSL_alpn_callback, table);
    SSL_CTX_set_app_data(ctx, table);
    if (table->ticket_period > 0) SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, COpenSSL_ticket_callback);
}

/// The DNS names of a certificate's subjectAltName (else its CN), each NUL-terminated,
/// written into `out`; returns how many, or -1 when `out` is too small.
static inline int COpenSSL_certificate_names(X509 *cert, char *out, int capacity) {
    int count = 0, used = 0;
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    if (names != NULL) {
        for (int i = 0; i < sk_GENERAL_NAME_num(names); i++) {
            GENERAL_NAME *name = sk_GENERAL_NAME_value(names, i);
            if (name->type != GEN_DNS) continue;
            const unsigned char *data = ASN1_STRING_get0_data(name->d.dNSName);
            int length = ASN1_STRING_length(name->d.dNSName);
            if (used + length + 1 > capacity) { GENERAL_NAMES_free(names); return -1; }
            memcpy(out + used, data, (size_t)length);
            out[used + length] = 0;
            used += length + 1;
            count++;
        }
        GENERAL_NAMES_free(names);
    }
    if (count == 0) {
        int length = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, out, capacity);
        if (length > 0) count = 1;
    }
    return count;
}

/// A certificate's notAfter as seconds since the epoch.
static inline long long COpenSSL_certificate_not_after(X509 *cert) {
    const ASN1_TIME *t = X509_get0_notAfter(cert);
    ASN1_TIME *epoch = ASN1_TIME_set(NULL, 0);
    int days = 0, seconds = 0;
    int ok = t != NULL && epoch != NULL && ASN1_TIME_diff(&days, &seconds, epoch, t) == 1;
    ASN1_TIME_free(epoch);
    return ok ? (long long)days * 86400 + seconds : 0;
}

/// The verified peer's subject (RFC 2253) into `out`; returns its length (0: none).
static inline int COpenSSL_peer_subject(SSL *ssl, char *out, int capacity) {
    X509 *peer = SSL_get0_peer_certificate(ssl);
    if (peer == NULL || capacity <= 1) return 0;
    BIO *bio = BIO_new(BIO_s_mem());
    if (bio == NULL) return 0;
    X509_NAME_print_ex(bio, X509_get_subject_name(peer), 0, XN_FLAG_RFC2253);
    int length = BIO_read(bio, out, capacity - 1);
    BIO_free(bio);
    if (length < 0) length = 0;
    out[length] = 0;
    return length;
}

/// Reads a private key without ever asking for a passphrase (OpenSSL's default callback
/// would prompt on the terminal): an encrypted key simply fails to load.
static inline int COpenSSL_no_passphrase(char *buf, int size, int rwflag, void *userdata) {
    (void)buf; (void)size; (void)rwflag; (void)userdata;
    return 0;
}
static inline EVP_PKEY *COpenSSL_read_private_key(BIO *bio) {
    return PEM_read_bio_PrivateKey(bio, NULL, COpenSSL_no_passphrase, NULL);
}

/// The verified peer certificate's common name into `out`; returns its length (0: none).
static inline int COpenSSL_peer_common_name(SSL *ssl, char *out, int capacity) {
    X509 *peer = SSL_get0_peer_certificate(ssl);
    if (peer == NULL || capacity <= 1) return 0;
    int length = X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, out, capacity);
    return length < 0 ? 0 : length;
}

static inline int COpenSSL_has_peer_certificate(SSL *ssl) { return SSL_get0_peer_certificate(ssl) != NULL; }

/// Why the last handshake step failed, for counting: 1 no client certificate, 2 an
/// untrusted one, 3 revoked, 4 expired, 0 anything else.
static inline int COpenSSL_client_auth_failure(SSL *ssl) {
    unsigned long code = ERR_peek_error();
    if (ERR_GET_LIB(code) == ERR_LIB_SSL && ERR_GET_REASON(code) == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE) return 1;
    long verify = SSL_get_verify_result(ssl);
    if (ERR_GET_LIB(code) == ERR_LIB_SSL && ERR_GET_REASON(code) == SSL_R_CERTIFICATE_VERIFY_FAILED) {
        if (verify == X509_V_ERR_CERT_REVOKED) return 3;
        if (verify == X509_V_ERR_CERT_HAS_EXPIRED) return 4;
        return 2;
    }
    return 0;
}

// MARK: TLS to upstreams (l4lb as the client)

/// A worker's resumable session per endpoint identity, each tagged with the serial of the
/// client context that made it: a context rebuilt with other settings (another CA) never
/// resumes a session verified under the old ones.
typedef struct COpenSSL_SessionStore {
    SSL_SESSION **sessions;
    unsigned long long *serials;
    int capacity;
} COpenSSL_SessionStore;

/// A client context's app data: where its sessions go, and its serial.
typedef struct COpenSSL_ClientTable {
    COpenSSL_SessionStore *store;
    unsigned long long serial;
} COpenSSL_ClientTable;

/// New session (TLS 1.2 at the handshake's end, TLS 1.3 on each NewSessionTicket): kept
/// as the endpoint's session; the SSL's app data is the endpoint identity + 1.
static inline int COpenSSL_new_session_callback(SSL *ssl, SSL_SESSION *session) {
    COpenSSL_ClientTable *table = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    long index = (long)(intptr_t)SSL_get_app_data(ssl) - 1;
    if (table == NULL || table->store == NULL || index < 0 || index >= table->store->capacity) return 0;
    COpenSSL_SessionStore *store = table->store;
    if (store->sessions[index] != NULL) SSL_SESSION_free(store->sessions[index]);
    store->sessions[index] = session;
    store->serials[index] = table->serial;
    return 1; // the store holds the reference now
}

static inline void COpenSSL_install_client_callbacks(SSL_CTX *ctx, COpenSSL_ClientTable *table) {
    SSL_CTX_set_app_data(ctx, table);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, COpenSSL_new_session_callback);
}

/// Starts `ssl` as a client of endpoint `index`, resuming its stored session when the
/// same context made it.
static inline void COpenSSL_prepare_client(SSL *ssl, long index, int reuse) {
    SSL_set_app_data(ssl, (void *)(intptr_t)(index + 1));
    COpenSSL_ClientTable *table = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    if (!reuse || table == NULL || table->store == NULL || index < 0 || index >= table->store->capacity) return;
    COpenSSL_SessionStore *store = table->store;
    SSL_SESSION *session = store->sessions[index];
    if (session != NULL && store->serials[index] == table->serial && SSL_SESSION_is_resumable(session))
        SSL_set_session(ssl, session);
}

/// Why the peer's certificate did not verify (a static string), when that is what the
/// last handshake step failed on; NULL for any other failure. (With verification off the
/// verify result may still say "self-signed"; it failed nothing then.)
static inline const char *COpenSSL_verify_failure(SSL *ssl) {
    unsigned long code = ERR_peek_error();
    if (ERR_GET_LIB(code) != ERR_LIB_SSL || ERR_GET_REASON(code) != SSL_R_CERTIFICATE_VERIFY_FAILED) return NULL;
    long verify = SSL_get_verify_result(ssl);
    return verify == X509_V_OK ? NULL : X509_verify_cert_error_string(verify);
}

/// Makes `ssl` check that the peer's certificate carries the IP address of the connected
/// socket `fd` (its peer) in its subjectAltName: the identity to verify when no name is.
static inline int COpenSSL_expect_peer_ip(SSL *ssl, int fd) {
    struct sockaddr_storage peer;
    socklen_t length = sizeof peer;
    if (getpeername(fd, (struct sockaddr *)&peer, &length) != 0) return 0;
    X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
    if (peer.ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)&peer;
        return X509_VERIFY_PARAM_set1_ip(param, (const unsigned char *)&v4->sin_addr, 4);
    }
    if (peer.ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)&peer;
        const unsigned char *bytes = (const unsigned char *)&v6->sin6_addr;
        static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (memcmp(bytes, mapped, 12) == 0) return X509_VERIFY_PARAM_set1_ip(param, bytes + 12, 4);
        return X509_VERIFY_PARAM_set1_ip(param, bytes, 16);
    }
    return 0;
}

#endif
