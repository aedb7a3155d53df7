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

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/opensslv.h>

#include "openssl_error.h"
#include "sectors.h"
#include "xts_ctx.h"

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

/* ---- the SIGBUS guard ----
 *
 * A volume may hand us its ciphertext straight from a shared mapping of the image
 * (saving a copy per read).  If the file shrinks under the mapping, touching the lost
 * pages raises SIGBUS, which would kill the process.  Every run is therefore guarded:
 * a fault inside it jumps back to run_guarded(), which reports it, and the caller
 * raises OSError(EIO), as a short pread would have.  Faults outside a guarded run go to
 * whatever handler was installed before ours (faulthandler, or the default action).
 *
 * sigsetjmp(.., 0) does not save the signal mask (a system call per run otherwise), so
 * the recovery path unblocks SIGBUS itself.  The thread-local jump target is written
 * before any guarded access, so the handler never touches uninitialised TLS.
 */
static _Thread_local sigjmp_buf *guard_jump = NULL;
static struct sigaction guard_previous;

static void
guard_on_sigbus(int sig, siginfo_t *info, void *uctx)
{
    sigjmp_buf *jump = guard_jump;
    if (jump != NULL) {
        guard_jump = NULL;
        siglongjmp(*jump, 1);
    }
    if (guard_previous.sa_flags & SA_SIGINFO) {
        if (guard_previous.sa_sigaction != NULL) {
            guard_previous.sa_sigaction(sig, info, uctx);
            return;
        }
    }
    else if (guard_previous.sa_handler != SIG_DFL && guard_previous.sa_handler != SIG_IGN) {
        guard_previous.sa_handler(sig);
        return;
    }
    /* The default action: returning repeats the faulting access, which then takes it. */
    signal(SIGBUS, SIG_DFL);
}

/* Put our handler first, chaining to the one installed now (unless that is ours). */
static int
guard_install(void)
{
    struct sigaction sa, current;
    if (sigaction(SIGBUS, NULL, &current) != 0) {
        return -1;
    }
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == guard_on_sigbus) {
        return 0;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = guard_on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    guard_previous = current;
    if (sigaction(SIGBUS, &sa, NULL) != 0) {
        return -1;
    }
    return 0;
}

/* xts_run, with a SIGBUS in it turned into a return of -1 (else 0, and *ok is set). */
int
run_guarded(int direct, int size, int enc, void *ctx, const unsigned char *src,
            unsigned char *dst, size_t nsectors, int sector_size, uint64_t first,
            int tweak, int *ok)
{
    sigjmp_buf jump;
    if (sigsetjmp(jump, 0) != 0) {
        sigset_t bus;
        sigemptyset(&bus);
        sigaddset(&bus, SIGBUS);
        pthread_sigmask(SIG_UNBLOCK, &bus, NULL);
        return -1;
    }
    guard_jump = &jump;
    *ok = xts_run(direct, size, enc, ctx, src, dst, nsectors, sector_size, first, tweak);
    guard_jump = NULL;
    return 0;
}

/* ---- the XtsKey type ---- */

static void
XtsKey_dealloc(XtsKeyObject *self)
{
    int d, i;
    for (d = 0; d < 2; d++) {
        for (i = 0; i < self->pool_len[d]; i++) {
            xts_ctx_free(self->direct, self->size, self->pool[d][i]);
            self->pool[d][i] = NULL;
        }
        self->pool_len[d] = 0;
        xts_ctx_free(self->direct, self->size, self->tmpl[d]);
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
    self->direct = xts_use_direct;
    ERR_clear_error();
    for (d = 0; d < 2; d++) {
        self->tmpl[d] = xts_ctx_new_keyed(self->direct, self->size, d, material, keylen);
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
            xts_ctx_free(self->direct, self->size, self->tmpl[d]);
            self->tmpl[d] = NULL;
        }
    }
    return rc;
}

/* A context ready for one call: from the pool, else a fresh copy of the template. */
void *
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
    ctx = xts_ctx_dup(self->direct, self->size, self->tmpl[enc]);
    if (ctx == NULL) {
        raise_openssl(PyExc_RuntimeError, "copying the AES-XTS context failed");
    }
    return ctx;
}

void
ctx_release(XtsKeyObject *self, int enc, void *ctx)
{
    pool_lock(self);
    if (self->pool_len[enc] < CTX_POOL_MAX) {
        self->pool[enc][self->pool_len[enc]++] = ctx;
        ctx = NULL;
    }
    pool_unlock(self);
    xts_ctx_free(self->direct, self->size, ctx);
}

static PyObject *
XtsKey_crypt(XtsKeyObject *self, PyObject *args, PyObject *kwds, int enc)
{
    static char *kwlist[] = {"src", "first_sector", "sector_size", "out", "tweak", NULL};
    Py_buffer src, dst;
    PyObject *first_obj, *out = Py_None, *result = NULL;
    unsigned long long first;
    int sector_size, tweak = TWEAK_PLAIN64, ok = 0, faulted;
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
    if (!TWEAK_VALID(tweak)) {
        PyErr_Format(PyExc_ValueError,
                     "tweak must be TWEAK_PLAIN64 (0) or TWEAK_PLAIN64BE (1), plus "
                     "tweak_step(n) for n in 0..3, got %d", tweak);
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
    faulted = run_guarded(self->direct, self->size, enc, ctx,
                          (const unsigned char *)src.buf, dst_ptr, nsectors, sector_size,
                          (uint64_t)first, tweak, &ok);
    Py_END_ALLOW_THREADS
    if (faulted) {
        /* Interrupted midway: the context's state is unknown, so it is not pooled. */
        xts_ctx_free(self->direct, self->size, ctx);
        PyObject *exc_args = Py_BuildValue(
            "(is)", EIO, "the data vanished while it was read (SIGBUS: the mapped file "
            "shrank under the mapping)");
        if (exc_args != NULL) {
            PyErr_SetObject(PyExc_OSError, exc_args);
            Py_DECREF(exc_args);
        }
        goto fail;
    }
    if (!ok) {
        /* A context that failed midway may hold odd state: do not pool it. */
        xts_ctx_free(self->direct, self->size, ctx);
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
"Encrypt a run of sectors; sector i uses tweak first_sector + i * step (mod 2**64),\n"
"where step is 1 << (tweak >> 8) (see tweak_step in the Python layer).\n"
"Returns new bytes, or `out` when given (which may be `src` itself).");

PyDoc_STRVAR(decrypt_doc,
"decrypt(src, first_sector, sector_size, out=None, tweak=TWEAK_PLAIN64)\n--\n\n"
"Decrypt a run of sectors; the inverse of encrypt with the same arguments.");

static PyMethodDef XtsKey_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))XtsKey_encrypt,
     METH_VARARGS | METH_KEYWORDS, encrypt_doc},
    {"decrypt", (PyCFunction)(void (*)(void))XtsKey_decrypt,
     METH_VARARGS | METH_KEYWORDS, decrypt_doc},
    {"decrypt_gather", (PyCFunction)XtsKey_decrypt_gather, METH_VARARGS,
     "decrypt_gather(src, items, sector_size, tweak)\n--\n\nDecrypt many runs of src: "
     "items are (offset in src, first_sector, out buffer).\n"
     "Returns the bytes decrypted; no item runs unless every one is valid."},
    {"encrypt_scatter", (PyCFunction)XtsKey_encrypt_scatter, METH_VARARGS,
     "encrypt_scatter(fd, items, sector_size, tweak, scratch)\n--\n\nEncrypt and "
     "pwrite many runs in order: items are (file offset, first_sector, plaintext).\n"
     "Returns (items written, errno of the first that failed or 0, bytes written)."},
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

static PyObject *
guard_sigbus(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    if (guard_install() != 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"guard_sigbus", guard_sigbus, METH_NOARGS,
     "guard_sigbus()\n--\n\nPut the SIGBUS guard of sector runs before whatever handler is "
     "installed now\n(e.g. faulthandler's, which would report the fault before passing "
     "it on).\nCall before decrypting from a mapping."},
    {"openssl_version", openssl_version, METH_NOARGS,
     "openssl_version()\n--\n\nThe version string of the libcrypto in use."},
    {NULL, NULL, 0, NULL},
};

static void
module_free(void *Py_UNUSED(module))
{
    xts_teardown();
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

    if (!xts_setup()) {
        return raise_openssl(PyExc_ImportError,
                             "libcrypto provides no AES-XTS (FIPS-only provider?)");
    }
    dispatch = xts_choose_dispatch();
    if (guard_install() != 0) {
        return PyErr_SetFromErrno(PyExc_ImportError);
    }
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
