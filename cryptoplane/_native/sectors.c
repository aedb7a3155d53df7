/*
 * cryptoplane._native._sectors: AES-XTS over runs of disk sectors, one call per run.
 *
 * The cipher itself is OpenSSL's (EVP, libcrypto); this file only drives it.  What it
 * buys over a Python loop is that the key schedule is prepared once per key, the whole
 * run of sectors is processed in one C loop, and the GIL is released around that loop
 * so that a thread pool can use several cores on one key.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/opensslv.h>
#include <openssl/provider.h>
#include <stdlib.h>

#define TWEAK_PLAIN64 0
#define TWEAK_PLAIN64BE 1

/*
 * Idle per-call contexts kept by a key.  Enough for a thread pool of a few workers on a
 * small machine; callers beyond that get a fresh copy that is freed after the call,
 * which is still correct, only a little slower.
 */
#define CTX_POOL_MAX 8

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
static int use_direct = 0;

typedef struct {
    PyObject_HEAD
    /*
     * Templates carry the expanded key schedule; calls never touch them, they copy.
     * Each is a provider algctx when `direct`, else an EVP_CIPHER_CTX.
     */
    void *tmpl[2]; /* [0] decrypt, [1] encrypt */
    /*
     * Pool of ready copies per direction.  Guarded by the GIL: pop and push happen
     * before and after the GIL is released, never during the unlocked loop.
     */
    void *pool[2][CTX_POOL_MAX];
    int pool_len[2];
    int key_bits;
    int size; /* index into cipher_xts and prov_fns */
    int direct;
#ifdef Py_GIL_DISABLED
    PyMutex pool_lock;
#endif
} XtsKeyObject;

static void
pool_lock(XtsKeyObject *self)
{
#ifdef Py_GIL_DISABLED
    PyMutex_Lock(&self->pool_lock);
#else
    (void)self;
#endif
}

static void
pool_unlock(XtsKeyObject *self)
{
#ifdef Py_GIL_DISABLED
    PyMutex_Unlock(&self->pool_lock);
#else
    (void)self;
#endif
}

/* Raise `exc` with OpenSSL's most recent error, and empty this thread's error queue. */
static PyObject *
raise_openssl(PyObject *exc, const char *what)
{
    unsigned long code = ERR_peek_last_error();
    char buf[256];
    if (code != 0) {
        ERR_error_string_n(code, buf, sizeof(buf));
        PyErr_Format(exc, "%s: %s", what, buf);
    }
    else {
        PyErr_Format(exc, "%s: OpenSSL reported no error detail", what);
    }
    ERR_clear_error();
    return NULL;
}

/* ---- the context layer: provider algctx when direct, EVP_CIPHER_CTX otherwise ---- */

static void
ctx_free(int direct, int size, void *ctx)
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
static void *
ctx_new_keyed(int direct, int size, int enc, const unsigned char *key, size_t keylen)
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
static void *
ctx_dup(int direct, int size, void *tmpl)
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
    if (tweak == TWEAK_PLAIN64) {
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
 * Sector numbers are uint64_t so they wrap modulo 2^64, as dm-crypt's do.
 */
static int
xts_run(int direct, int size, int enc, void *ctx, const unsigned char *src,
        unsigned char *dst, size_t nsectors, int sector_size, uint64_t sector,
        int tweak)
{
    unsigned char iv[16];
    size_t i;

    memset(iv, 0, sizeof(iv));
    if (direct) {
        const ProvFns *f = &prov_fns[size];
        OSSL_FUNC_cipher_encrypt_init_fn *init = enc ? f->einit : f->dinit;
        size_t outl;
        for (i = 0; i < nsectors; i++, sector++) {
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
        for (i = 0; i < nsectors; i++, sector++) {
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

/* ---- the XtsKey type ---- */

static void
XtsKey_dealloc(XtsKeyObject *self)
{
    int d, i;
    for (d = 0; d < 2; d++) {
        for (i = 0; i < self->pool_len[d]; i++) {
            ctx_free(self->direct, self->size, self->pool[d][i]);
            self->pool[d][i] = NULL;
        }
        self->pool_len[d] = 0;
        ctx_free(self->direct, self->size, self->tmpl[d]);
        self->tmpl[d] = NULL;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
XtsKey_init(XtsKeyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", NULL};
    Py_buffer key;
    unsigned char material[64];
    size_t keylen;
    int d, rc = -1;

    if (self->tmpl[0] != NULL || self->tmpl[1] != NULL) {
        PyErr_SetString(PyExc_TypeError, "XtsKey is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*:XtsKey", kwlist, &key)) {
        return -1;
    }
    if (key.len != 32 && key.len != 64) {
        PyErr_Format(PyExc_ValueError,
                     "AES-XTS key must be 32 bytes (AES-128-XTS) or 64 bytes "
                     "(AES-256-XTS), got %zd bytes", key.len);
        PyBuffer_Release(&key);
        return -1;
    }
    /* Private copy so the caller's buffer can change under us without surprises. */
    keylen = (size_t)key.len;
    memcpy(material, key.buf, keylen);
    PyBuffer_Release(&key);
    if (CRYPTO_memcmp(material, material + keylen / 2, keylen / 2) == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "AES-XTS key halves are equal: the data key and the tweak key "
                        "must differ (IEEE 1619; OpenSSL refuses such keys too)");
        goto done;
    }
    self->key_bits = (int)keylen * 4;
    self->size = keylen == 32 ? 0 : 1;
    self->direct = use_direct;
    ERR_clear_error();
    for (d = 0; d < 2; d++) {
        self->tmpl[d] = ctx_new_keyed(self->direct, self->size, d, material, keylen);
        if (self->tmpl[d] == NULL) {
            raise_openssl(PyExc_ValueError, "OpenSSL rejected the AES-XTS key");
            goto done;
        }
    }
    rc = 0;
done:
    OPENSSL_cleanse(material, sizeof(material));
    if (rc != 0) {
        for (d = 0; d < 2; d++) {
            ctx_free(self->direct, self->size, self->tmpl[d]);
            self->tmpl[d] = NULL;
        }
    }
    return rc;
}

/* A context ready for one call: from the pool, else a fresh copy of the template. */
static void *
ctx_acquire(XtsKeyObject *self, int enc)
{
    void *ctx = NULL;
    pool_lock(self);
    if (self->pool_len[enc] > 0) {
        ctx = self->pool[enc][--self->pool_len[enc]];
    }
    pool_unlock(self);
    if (ctx != NULL) {
        return ctx;
    }
    ERR_clear_error();
    ctx = ctx_dup(self->direct, self->size, self->tmpl[enc]);
    if (ctx == NULL) {
        raise_openssl(PyExc_RuntimeError, "copying the AES-XTS context failed");
    }
    return ctx;
}

static void
ctx_release(XtsKeyObject *self, int enc, void *ctx)
{
    pool_lock(self);
    if (self->pool_len[enc] < CTX_POOL_MAX) {
        self->pool[enc][self->pool_len[enc]++] = ctx;
        ctx = NULL;
    }
    pool_unlock(self);
    ctx_free(self->direct, self->size, ctx);
}

static PyObject *
XtsKey_crypt(XtsKeyObject *self, PyObject *args, PyObject *kwds, int enc)
{
    static char *kwlist[] = {"src", "first_sector", "sector_size", "out", "tweak", NULL};
    Py_buffer src, dst;
    PyObject *first_obj, *out = Py_None, *result = NULL;
    unsigned long long first;
    int sector_size, tweak = TWEAK_PLAIN64, ok;
    void *ctx;
    unsigned char *dst_ptr;
    size_t nsectors;

    if (self->tmpl[0] == NULL) {
        PyErr_SetString(PyExc_TypeError, "XtsKey is not initialised");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*Oi|Oi", kwlist, &src, &first_obj,
                                     &sector_size, &out, &tweak)) {
        return NULL;
    }
    dst.obj = NULL;
    /* Any integer-like (numpy's too), as the pure-Python fallback accepts. */
    first_obj = PyNumber_Index(first_obj);
    if (first_obj == NULL) {
        goto fail;
    }
    first = PyLong_AsUnsignedLongLong(first_obj);
    Py_DECREF(first_obj);
    if (first == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError,
                        "first_sector must be an unsigned 64-bit sector number "
                        "(0 <= first_sector < 2**64)");
        goto fail;
    }
    if (sector_size != 512 && sector_size != 1024 && sector_size != 2048
        && sector_size != 4096) {
        PyErr_Format(PyExc_ValueError,
                     "sector_size must be 512, 1024, 2048 or 4096, got %d", sector_size);
        goto fail;
    }
    if (tweak != TWEAK_PLAIN64 && tweak != TWEAK_PLAIN64BE) {
        PyErr_Format(PyExc_ValueError,
                     "tweak must be TWEAK_PLAIN64 (0) or TWEAK_PLAIN64BE (1), got %d",
                     tweak);
        goto fail;
    }
    if (src.len == 0 || src.len % sector_size != 0) {
        PyErr_Format(PyExc_ValueError,
                     "data length must be a non-zero multiple of the sector size: "
                     "got %zd bytes with sector_size %d", src.len, sector_size);
        goto fail;
    }
    nsectors = (size_t)(src.len / sector_size);

    if (out == Py_None) {
        /* Written in place below: the bytes object is not shared until we return it. */
        result = PyBytes_FromStringAndSize(NULL, src.len);
        if (result == NULL) {
            goto fail;
        }
        dst_ptr = (unsigned char *)PyBytes_AS_STRING(result);
    }
    else {
        if (PyObject_GetBuffer(out, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "out must be a writable C-contiguous buffer, not %.100s",
                         Py_TYPE(out)->tp_name);
            dst.obj = NULL;
            goto fail;
        }
        if (dst.len != src.len) {
            PyErr_Format(PyExc_ValueError,
                         "out must be exactly as long as src: got %zd bytes for "
                         "%zd bytes of data", dst.len, src.len);
            goto fail;
        }
        dst_ptr = (unsigned char *)dst.buf;
        /* Exactly in place is fine for XTS; a shifted overlap would eat its own input. */
        if (dst_ptr != (unsigned char *)src.buf
            && dst_ptr < (unsigned char *)src.buf + src.len
            && (unsigned char *)src.buf < dst_ptr + dst.len) {
            PyErr_SetString(PyExc_ValueError,
                            "out overlaps src without being the same memory; use the "
                            "same buffer for in-place work or a disjoint one");
            goto fail;
        }
        Py_INCREF(out);
        result = out;
    }

    ctx = ctx_acquire(self, enc);
    if (ctx == NULL) {
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    ERR_clear_error();
    ok = xts_run(self->direct, self->size, enc, ctx, (const unsigned char *)src.buf,
                 dst_ptr, nsectors, sector_size, (uint64_t)first, tweak);
    Py_END_ALLOW_THREADS
    if (!ok) {
        /* A context that failed midway may hold odd state: do not pool it. */
        ctx_free(self->direct, self->size, ctx);
        raise_openssl(PyExc_RuntimeError,
                      enc ? "AES-XTS encryption failed" : "AES-XTS decryption failed");
        goto fail;
    }
    ctx_release(self, enc, ctx);
    if (dst.obj != NULL) {
        PyBuffer_Release(&dst);
    }
    PyBuffer_Release(&src);
    return result;

fail:
    Py_XDECREF(result);
    if (dst.obj != NULL) {
        PyBuffer_Release(&dst);
    }
    PyBuffer_Release(&src);
    return NULL;
}

static PyObject *
XtsKey_encrypt(XtsKeyObject *self, PyObject *args, PyObject *kwds)
{
    return XtsKey_crypt(self, args, kwds, 1);
}

static PyObject *
XtsKey_decrypt(XtsKeyObject *self, PyObject *args, PyObject *kwds)
{
    return XtsKey_crypt(self, args, kwds, 0);
}

static PyObject *
XtsKey_reduce(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    (void)self;
    PyErr_SetString(PyExc_TypeError,
                    "XtsKey cannot be pickled or copied: it holds key material");
    return NULL;
}

static PyObject *
XtsKey_repr(XtsKeyObject *self)
{
    /* Only the size: key material must never reach a log. */
    return PyUnicode_FromFormat("<XtsKey AES-%d-XTS native>", self->key_bits);
}

static PyObject *
XtsKey_get_key_size(XtsKeyObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->key_bits / 4);
}

PyDoc_STRVAR(encrypt_doc,
"encrypt(src, first_sector, sector_size, out=None, tweak=TWEAK_PLAIN64)\n--\n\n"
"Encrypt a run of sectors; sector i uses tweak first_sector + i (mod 2**64).\n"
"Returns new bytes, or `out` when given (which may be `src` itself).");

PyDoc_STRVAR(decrypt_doc,
"decrypt(src, first_sector, sector_size, out=None, tweak=TWEAK_PLAIN64)\n--\n\n"
"Decrypt a run of sectors; the inverse of encrypt with the same arguments.");

static PyMethodDef XtsKey_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))XtsKey_encrypt,
     METH_VARARGS | METH_KEYWORDS, encrypt_doc},
    {"decrypt", (PyCFunction)(void (*)(void))XtsKey_decrypt,
     METH_VARARGS | METH_KEYWORDS, decrypt_doc},
    {"__reduce__", XtsKey_reduce, METH_NOARGS, NULL},
    {"__reduce_ex__", (PyCFunction)(void (*)(void))XtsKey_reduce, METH_O, NULL},
    {"__copy__", XtsKey_reduce, METH_NOARGS, NULL},
    {"__deepcopy__", (PyCFunction)(void (*)(void))XtsKey_reduce, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef XtsKey_getset[] = {
    {"key_size", (getter)XtsKey_get_key_size, NULL, "Key length in bytes (32 or 64).",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(XtsKey_doc,
"XtsKey(key)\n--\n\n"
"An AES-XTS key (32 bytes: AES-128-XTS, 64 bytes: AES-256-XTS) prepared once\n"
"for encrypting and decrypting runs of sectors with OpenSSL, without the GIL.");

static PyTypeObject XtsKeyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cryptoplane._native._sectors.XtsKey",
    .tp_basicsize = sizeof(XtsKeyObject),
    .tp_dealloc = (destructor)XtsKey_dealloc,
    .tp_repr = (reprfunc)XtsKey_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = XtsKey_doc,
    .tp_methods = XtsKey_methods,
    .tp_getset = XtsKey_getset,
    .tp_init = (initproc)XtsKey_init,
    .tp_new = PyType_GenericNew,
};

static PyObject *
openssl_version(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromString(OpenSSL_version(OPENSSL_VERSION));
}

static PyMethodDef module_methods[] = {
    {"openssl_version", openssl_version, METH_NOARGS,
     "openssl_version()\n--\n\nThe version string of the libcrypto in use."},
    {NULL, NULL, 0, NULL},
};

static void
module_free(void *Py_UNUSED(module))
{
    EVP_CIPHER_free(cipher_xts[0]);
    EVP_CIPHER_free(cipher_xts[1]);
    cipher_xts[0] = cipher_xts[1] = NULL;
    use_direct = 0;
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
    te = ctx_new_keyed(1, size, 1, key, keylen);
    td = ctx_new_keyed(1, size, 0, key, keylen);
    ee = ctx_new_keyed(0, size, 1, key, keylen);
    de = te != NULL ? ctx_dup(1, size, te) : NULL;
    if (te != NULL && td != NULL && ee != NULL && de != NULL
        && xts_run(1, size, 1, de, src, a, N, SS, UINT64_MAX - 1, TWEAK_PLAIN64)
        && xts_run(0, size, 1, ee, src, b, N, SS, UINT64_MAX - 1, TWEAK_PLAIN64)
        && memcmp(a, b, sizeof(a)) == 0 && memcmp(a, src, sizeof(a)) != 0
        && xts_run(1, size, 0, td, a, c, N, SS, UINT64_MAX - 1, TWEAK_PLAIN64)
        && memcmp(c, src, sizeof(c)) == 0) {
        ok = 1;
    }
    ctx_free(1, size, te);
    ctx_free(1, size, td);
    ctx_free(1, size, de);
    ctx_free(0, size, ee);
    ERR_clear_error();
    return ok;
}

/* Chooses the dispatch; CRYPTOPLANE_NATIVE_DISPATCH=evp forces plain EVP. */
static const char *
choose_dispatch(void)
{
    const char *forced = getenv("CRYPTOPLANE_NATIVE_DISPATCH");
    use_direct = 0;
    if (forced != NULL && strcmp(forced, "evp") == 0) {
        return "evp";
    }
    if (!resolve_provider(0, "AES-128-XTS") || !resolve_provider(1, "AES-256-XTS")) {
        return "evp";
    }
    if (!direct_self_test(0) || !direct_self_test(1)) {
        return "evp";
    }
    use_direct = 1;
    return "provider";
}

static struct PyModuleDef sectors_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_sectors",
    .m_doc = "AES-XTS over runs of sectors via OpenSSL EVP, with the GIL released.",
    .m_size = -1,
    .m_methods = module_methods,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__sectors(void)
{
    PyObject *m;
    const char *dispatch;

    if (cipher_xts[0] == NULL) {
        cipher_xts[0] = EVP_CIPHER_fetch(NULL, "AES-128-XTS", NULL);
        cipher_xts[1] = EVP_CIPHER_fetch(NULL, "AES-256-XTS", NULL);
        if (cipher_xts[0] == NULL || cipher_xts[1] == NULL) {
            module_free(NULL);
            return raise_openssl(PyExc_ImportError,
                                 "libcrypto provides no AES-XTS (FIPS-only provider?)");
        }
    }
    dispatch = choose_dispatch();
    if (PyType_Ready(&XtsKeyType) < 0) {
        return NULL;
    }
    m = PyModule_Create(&sectors_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "TWEAK_PLAIN64", TWEAK_PLAIN64) < 0
        || PyModule_AddIntConstant(m, "TWEAK_PLAIN64BE", TWEAK_PLAIN64BE) < 0
        || PyModule_AddStringConstant(m, "DISPATCH", dispatch) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&XtsKeyType);
    if (PyModule_AddObject(m, "XtsKey", (PyObject *)&XtsKeyType) < 0) {
        Py_DECREF(&XtsKeyType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
