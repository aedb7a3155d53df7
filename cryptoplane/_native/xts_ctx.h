/*
 * The OpenSSL side of the sector kernel (xts_ctx.c), shared with the Python type
 * (sectors.c).  A "context" is a keyed, one-direction AES-XTS state: a provider algctx
 * when `direct`, else an EVP_CIPHER_CTX.  `size` is 0 for AES-128-XTS, 1 for AES-256-XTS.
 */
#ifndef CRYPTOPLANE_XTS_CTX_H
#define CRYPTOPLANE_XTS_CTX_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/core_dispatch.h>
#include <openssl/evp.h>

#define TWEAK_PLAIN64 0
#define TWEAK_PLAIN64BE 1
/*
 * A tweak code is a layout (the low byte: TWEAK_PLAIN64 or TWEAK_PLAIN64BE) plus, in
 * bits 8 and 9, the log2 of how far the IV advances per sector.  dm-crypt counts LUKS2
 * IVs in 512-byte units whatever the sector size, so a 4096-byte sector advances it by
 * 8 (TWEAK_STEP_SHIFT(3)); 0 counts whole sectors (dm-crypt's iv_large_sectors).
 */
#define TWEAK_LAYOUT_MASK 0xff
#define TWEAK_STEP_SHIFT(log2) ((log2) << 8)
#define TWEAK_STEP_LOG2(code) (((code) >> 8) & 3)
#define TWEAK_VALID(code) \
    (((code) & ~0x3ff) == 0 && ((code) & TWEAK_LAYOUT_MASK) <= TWEAK_PLAIN64BE)

/* Whether new keys use the provider's dispatch table; set by xts_choose_dispatch. */
extern int xts_use_direct;

/* Fetch the ciphers; 1 on success, 0 with an OpenSSL error queued. */
int xts_setup(void);
void xts_teardown(void);
/* Pick and self-test the dispatch; returns "provider" or "evp". */
const char *xts_choose_dispatch(void);

void xts_ctx_free(int direct, int size, void *ctx);
void *xts_ctx_new_keyed(int direct, int size, int enc, const unsigned char *key,
                        size_t keylen);
void *xts_ctx_dup(int direct, int size, void *tmpl);
int xts_run(int direct, int size, int enc, void *ctx, const unsigned char *src,
            unsigned char *dst, size_t nsectors, int sector_size, uint64_t sector,
            int tweak);

#endif
