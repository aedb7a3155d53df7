/*
 * The OpenSSL side of the sector kernel: AES-XTS contexts and the per-sector loop.
 * Nothing here touches Python, so all of it may run with the GIL released.
 */
#include "xts_ctx.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/provider.h>

/* Fetched once: a fetch takes the provider store's lock, which we want off every path. */
static EVP_CIPHER *cipher_xts[2] = {NULL, NULL}; /* [0] AES-128-XTS, [1] AES-256-XTS */

/*
 * Why not only EVP: in OpenSSL 3.0, EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1)
 * asks the provider for the IV length through an OSSL_PARAM lookup (a chain of strcmp)
 * on every call.  With one IV per 512-byte sector that costs ~40 ns of ~150 ns per
 * sector (measured with perf here).  The provider's own dispatch table, obtained through
 * the public OSSL_PROVIDER_query_operation(), sets the IV with a memcpy.  The cipher is
 * still the provider's implementation, the very one EVP would call; we only skip EVP's
 * bookkeeping.  If the table cannot be found, or fails a self-test at import, the EVP
 * path below is used instead.
 */
typedef struct {
    void *provctx;
    OSSL_FUNC_cipher_newctx_fn *newctx;
    OSSL_FUNC_cipher_freectx_fn *freectx;
    OSSL_FUNC_cipher_dupctx_fn *dupctx;
    OSSL_FUNC_cipher_encrypt_init_fn *einit;
    OSSL_FUNC_cipher_decrypt_init_fn *dinit;
    OSSL_FUNC_cipher_update_fn *update;
} ProvFns;

static ProvFns prov_fns[2];
int xts_use_direct = 0;

/* ---- the context layer: provider algctx when direct, EVP_CIPHER_CTX otherwise ---- */

void
xts_ctx_free(int direct, int size, void *ctx)
{
    if (ctx == NULL) {
        return;
    }
    /* Both free functions cleanse the context, key schedules included. */
    if (direct) {
        prov_fns[size].freectx(ctx);
    }
    else {
        EVP_CIPHER_CTX_free((EVP_CIPHER_CTX *)ctx);
    }
}

/* A keyed context for one direction; NULL with an OpenSSL error queued on failure. */
void *
xts_ctx_new_keyed(int direct, int size, int enc, const unsigned char *key,
                  size_t keylen)
{
    if (direct) {
        const ProvFns *f = &prov_fns[size];
        void *ctx = f->newctx(f->provctx);
        int ok;
        if (ctx == NULL) {
            return NULL;
        }
        ok = enc ? f->einit(ctx, key, keylen, NULL, 0, NULL)
                 : f->dinit(ctx, key, keylen, NULL, 0, NULL);
        if (!ok) {
            f->freectx(ctx);
            return NULL;
        }
        return ctx;
    }
    else {
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        if (ctx == NULL) {
            return NULL;
        }
        if (EVP_CipherInit_ex(ctx, cipher_xts[size], NULL, key, NULL, enc) != 1) {
            EVP_CIPHER_CTX_free(ctx);
            return NULL;
        }
        return ctx;
    }
}

/* Copies the expanded key schedule; no key expansion is redone. */
void *
xts_ctx_dup(int direct, int size, void *tmpl)
{
    EVP_CIPHER_CTX *ctx;
    if (direct) {
        return prov_fns[size].dupctx(tmpl);
    }
    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) {
        return NULL;
    }
    if (EVP_CIPHER_CTX_copy(ctx, (EVP_CIPHER_CTX *)tmpl) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static void
make_iv(unsigned char iv[16], uint64_t sector, int tweak)
{
    int k;
    if ((tweak & TWEAK_LAYOUT_MASK) == TWEAK_PLAIN64) {
        for (k = 0; k < 8; k++) {
            iv[k] = (unsigned char)(sector >> (8 * k));
        }
    }
    else {
        for (k = 0; k < 8; k++) {
            iv[15 - k] = (unsigned char)(sector >> (8 * k));
        }
    }
}

/*
 * The unlocked loop.  Returns 1 on success, 0 on an OpenSSL failure (the error stays
 * on this thread's queue for the caller to report once the GIL is back).  XTS treats
 * every update as one data unit, so each sector gets its own IV and exactly one update.
 * Sector numbers are uint64_t so they wrap modulo 2^64, as dm-crypt's do; each sector's
 * IV is the previous one plus the code's step.
 */
int
xts_run(int direct, int size, int enc, void *ctx, const unsigned char *src,
        unsigned char *dst, size_t nsectors, int sector_size, uint64_t sector,
        int tweak)
{
    unsigned char iv[16];
    size_t i;
    const uint64_t step = (uint64_t)1 << TWEAK_STEP_LOG2(tweak);

    memset(iv, 0, sizeof(iv));
    if (direct) {
        const ProvFns *f = &prov_fns[size];
        OSSL_FUNC_cipher_encrypt_init_fn *init = enc ? f->einit : f->dinit;
        size_t outl;
        for (i = 0; i < nsectors; i++, sector += step) {
            make_iv(iv, sector, tweak);
            if (!init(ctx, NULL, 0, iv, sizeof(iv), NULL)
                || !f->update(ctx, dst, &outl, (size_t)sector_size, src,
                              (size_t)sector_size)
                || outl != (size_t)sector_size) {
                return 0;
            }
            src += sector_size;
            dst += sector_size;
        }
    }
    else {
        EVP_CIPHER_CTX *c = (EVP_CIPHER_CTX *)ctx;
        int outl;
        for (i = 0; i < nsectors; i++, sector += step) {
            make_iv(iv, sector, tweak);
            if (EVP_CipherInit_ex(c, NULL, NULL, NULL, iv, -1) != 1
                || EVP_CipherUpdate(c, dst, &outl, src, sector_size) != 1
                || outl != sector_size) {
                return 0;
            }
            src += sector_size;
            dst += sector_size;
        }
    }
    return 1;
}

int
xts_setup(void)
{
    if (cipher_xts[0] == NULL) {
        cipher_xts[0] = EVP_CIPHER_fetch(NULL, "AES-128-XTS", NULL);
        cipher_xts[1] = EVP_CIPHER_fetch(NULL, "AES-256-XTS", NULL);
    }
    if (cipher_xts[0] == NULL || cipher_xts[1] == NULL) {
        xts_teardown();
        return 0;
    }
    return 1;
}

void
xts_teardown(void)
{
    EVP_CIPHER_free(cipher_xts[0]);
    EVP_CIPHER_free(cipher_xts[1]);
    cipher_xts[0] = cipher_xts[1] = NULL;
    xts_use_direct = 0;
}

/* Does the colon-separated OSSL_ALGORITHM name list contain `name`? */
static int
names_contain(const char *names, const char *name)
{
    size_t n = strlen(name);
    const char *p = names;
    while (p != NULL && *p != '\0') {
        const char *end = strchr(p, ':');
        size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
        if (len == n && OPENSSL_strncasecmp(p, name, n) == 0) {
            return 1;
        }
        p = end != NULL ? end + 1 : NULL;
    }
    return 0;
}

/* Fill prov_fns[size] from the provider that serves the fetched cipher; 1 on success. */
static int
resolve_provider(int size, const char *name)
{
    const OSSL_PROVIDER *prov = EVP_CIPHER_get0_provider(cipher_xts[size]);
    const OSSL_ALGORITHM *alg, *algs;
    const OSSL_DISPATCH *fn;
    ProvFns f;
    int no_cache = 0;

    if (prov == NULL) {
        return 0;
    }
    memset(&f, 0, sizeof(f));
    f.provctx = OSSL_PROVIDER_get0_provider_ctx(prov);
    algs = OSSL_PROVIDER_query_operation(prov, OSSL_OP_CIPHER, &no_cache);
    if (algs == NULL) {
        return 0;
    }
    for (alg = algs; alg->algorithm_names != NULL; alg++) {
        if (names_contain(alg->algorithm_names, name)) {
            break;
        }
    }
    if (alg->algorithm_names != NULL) {
        for (fn = alg->implementation; fn->function_id != 0; fn++) {
            switch (fn->function_id) {
            case OSSL_FUNC_CIPHER_NEWCTX:
                f.newctx = OSSL_FUNC_cipher_newctx(fn);
                break;
            case OSSL_FUNC_CIPHER_FREECTX:
                f.freectx = OSSL_FUNC_cipher_freectx(fn);
                break;
            case OSSL_FUNC_CIPHER_DUPCTX:
                f.dupctx = OSSL_FUNC_cipher_dupctx(fn);
                break;
            case OSSL_FUNC_CIPHER_ENCRYPT_INIT:
                f.einit = OSSL_FUNC_cipher_encrypt_init(fn);
                break;
            case OSSL_FUNC_CIPHER_DECRYPT_INIT:
                f.dinit = OSSL_FUNC_cipher_decrypt_init(fn);
                break;
            case OSSL_FUNC_CIPHER_UPDATE:
                f.update = OSSL_FUNC_cipher_update(fn);
                break;
            default:
                break;
            }
        }
    }
    /* The function pointers stay valid: cipher_xts[size] holds a provider reference. */
    OSSL_PROVIDER_unquery_operation(prov, OSSL_OP_CIPHER, algs);
    if (f.newctx == NULL || f.freectx == NULL || f.dupctx == NULL || f.einit == NULL
        || f.dinit == NULL || f.update == NULL) {
        return 0;
    }
    prov_fns[size] = f;
    return 1;
}

/*
 * The direct path is only trusted once it gives EVP's bytes: encrypt a few sectors
 * (with a wrapping sector number, through a duplicated context) both ways and compare,
 * and check that decryption inverts it.
 */
static int
direct_self_test(int size)
{
    enum { SS = 512, N = 3 };
    static unsigned char key[64], src[SS * N], a[SS * N], b[SS * N], c[SS * N];
    size_t keylen = size == 0 ? 32 : 64, i;
    void *te, *td, *de, *ee;
    int ok = 0;

    for (i = 0; i < sizeof(key); i++) {
        key[i] = (unsigned char)(i * 37 + 11);
    }
    for (i = 0; i < sizeof(src); i++) {
        src[i] = (unsigned char)(i * 13 + 7);
    }
    te = xts_ctx_new_keyed(1, size, 1, key, keylen);
    td = xts_ctx_new_keyed(1, size, 0, key, keylen);
    ee = xts_ctx_new_keyed(0, size, 1, key, keylen);
    de = te != NULL ? xts_ctx_dup(1, size, te) : NULL;
    if (te != NULL && td != NULL && ee != NULL && de != NULL
        && xts_run(1, size, 1, de, src, a, N, SS, UINT64_MAX - 1, TWEAK_PLAIN64)
        && xts_run(0, size, 1, ee, src, b, N, SS, UINT64_MAX - 1, TWEAK_PLAIN64)
        && memcmp(a, b, sizeof(a)) == 0 && memcmp(a, src, sizeof(a)) != 0
        && xts_run(1, size, 0, td, a, c, N, SS, UINT64_MAX - 1, TWEAK_PLAIN64)
        && memcmp(c, src, sizeof(c)) == 0) {
        ok = 1;
    }
    xts_ctx_free(1, size, te);
    xts_ctx_free(1, size, td);
    xts_ctx_free(1, size, de);
    xts_ctx_free(0, size, ee);
    ERR_clear_error();
    return ok;
}

/* Chooses the dispatch; CRYPTOPLANE_NATIVE_DISPATCH=evp forces plain EVP. */
const char *
xts_choose_dispatch(void)
{
    const char *forced = getenv("CRYPTOPLANE_NATIVE_DISPATCH");
    xts_use_direct = 0;
    if (forced != NULL && strcmp(forced, "evp") == 0) {
        return "evp";
    }
    if (!resolve_provider(0, "AES-128-XTS") || !resolve_provider(1, "AES-256-XTS")) {
        return "evp";
    }
    if (!direct_self_test(0) || !direct_self_test(1)) {
        return "evp";
    }
    xts_use_direct = 1;
    return "provider";
}
