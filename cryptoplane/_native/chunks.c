/*
 * cryptoplane._native._chunks: age's STREAM payload (ChaCha20-Poly1305 chunks), many
 * chunks per call.
 *
 * The cipher is OpenSSL's (EVP, libcrypto); this file only drives it.  What it buys over
 * the pure-Python loop in chunks_fallback.py is one C loop per batch with one context
 * keyed once, and the GIL released around that loop, so that a few threads can seal or
 * open one stream on several cores.  The contract (bytes, errors, messages) is the one
 * documented in chunks_fallback.py; the tests hold the two to it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include "openssl_error.h"

#define KEY_LEN 32
#define NONCE_LEN 12
#define TAG_LEN 16

/* Fetched once: a fetch takes the provider store's lock, which we want off every call. */
static EVP_CIPHER *chacha = NULL;
/* chunks_fallback.ChunkAuthenticationFailed and cryptoplane.exceptions.InvalidRequest. */
static PyObject *ChunkAuthFailed = NULL;
static PyObject *InvalidRequest = NULL;
/* 2**88, the number of chunks a STREAM can have (an 11-byte counter). */
static PyObject *MaxCounter = NULL;

/*
 * The chunk layout of a `total`-byte batch cut in `unit`s (the fallback's _spans):
 * `count` chunks, all `unit` long but the last, which is `tail` long.  -1 with
 * InvalidRequest set (the fallback's messages) when the batch cannot be cut so.
 */
static int
layout(Py_ssize_t total, Py_ssize_t unit, int final, Py_ssize_t least,
       Py_ssize_t *count, Py_ssize_t *tail)
{
    if (final) {
        if (total < least) {
            PyErr_Format(InvalidRequest,
                         "a final batch needs at least %zd bytes, got %zd", least, total);
            return -1;
        }
        /* ceil: a full last chunk is the final one (only an empty stream ends empty) */
        *count = total / unit + (total % unit != 0);
        if (*count == 0) {
            *count = 1;
        }
        *tail = total - (*count - 1) * unit;
        if (*tail < least) {
            PyErr_Format(InvalidRequest,
                         "the final chunk needs at least %zd bytes, got %zd", least, *tail);
            return -1;
        }
        return 0;
    }
    if (total == 0 || total % unit != 0) {
        PyErr_Format(InvalidRequest,
                     "a non-final batch must be whole chunks of %zd bytes, got %zd",
                     unit, total);
        return -1;
    }
    *count = total / unit;
    *tail = unit;
    return 0;
}

/*
 * Check 0 <= counter and counter + count <= 2**88 (Python ints, so that no value can
 * wrap), and split counter into its high 24 and low 64 bits.
 */
static int
split_counter(PyObject *counter, Py_ssize_t count, uint32_t *hi, uint64_t *lo)
{
    PyObject *index, *end = NULL, *shifted = NULL, *sixty_four = NULL, *n = NULL;
    PyObject *zero = NULL;
    int negative, over, rc = -1;

    index = PyNumber_Index(counter);
    if (index == NULL) {
        return -1;
    }
    n = PyLong_FromSsize_t(count);
    if (n == NULL) {
        goto done;
    }
    end = PyNumber_Add(index, n);
    if (end == NULL) {
        goto done;
    }
    zero = PyLong_FromLong(0);
    if (zero == NULL) {
        goto done;
    }
    negative = PyObject_RichCompareBool(index, zero, Py_LT);
    over = PyObject_RichCompareBool(end, MaxCounter, Py_GT);
    if (negative < 0 || over < 0) {
        goto done;
    }
    if (negative || over) {
        PyErr_SetString(InvalidRequest, "STREAM chunk counter out of range (2**88 chunks)");
        goto done;
    }
    *lo = PyLong_AsUnsignedLongLongMask(index);
    if (*lo == (uint64_t)-1 && PyErr_Occurred()) {
        goto done;
    }
    sixty_four = PyLong_FromLong(64);
    if (sixty_four == NULL) {
        goto done;
    }
    shifted = PyNumber_Rshift(index, sixty_four);
    if (shifted == NULL) {
        goto done;
    }
    *hi = (uint32_t)PyLong_AsUnsignedLong(shifted);
    if (PyErr_Occurred()) {
        goto done;
    }
    rc = 0;
done:
    Py_DECREF(index);
    Py_XDECREF(n);
    Py_XDECREF(zero);
    Py_XDECREF(end);
    Py_XDECREF(sixty_four);
    Py_XDECREF(shifted);
    return rc;
}

/* The nonce of chunk (hi, lo): 11 bytes big-endian, then the final flag. */
static void
make_nonce(unsigned char nonce[NONCE_LEN], uint32_t hi, uint64_t lo, int final)
{
    int k;
    nonce[0] = (unsigned char)(hi >> 16);
    nonce[1] = (unsigned char)(hi >> 8);
    nonce[2] = (unsigned char)hi;
    for (k = 0; k < 8; k++) {
        nonce[3 + k] = (unsigned char)(lo >> (56 - 8 * k));
    }
    nonce[11] = final ? 1 : 0;
}

/*
 * The unlocked loop over `count` chunks, `unit` plaintext bytes each but the last
 * (`tail`).  Returns -1 on success, the failing chunk's index when a tag does not
 * verify (its plaintext in dst already cleansed), or -2 on any other OpenSSL failure
 * (the error stays on this thread's queue for the caller to report).
 */
static Py_ssize_t
run(EVP_CIPHER_CTX *ctx, int enc, const unsigned char *src, unsigned char *dst,
    Py_ssize_t count, Py_ssize_t unit, Py_ssize_t tail, int final, uint32_t hi,
    uint64_t lo)
{
    unsigned char nonce[NONCE_LEN], tag[TAG_LEN];
    Py_ssize_t i, len;
    int outl, finl;

    /* the counter is 88 bits: the low word carries into the high one */
    for (i = 0; i < count; i++, hi += ++lo == 0) {
        int last = i == count - 1;
        len = last ? tail : unit;
        make_nonce(nonce, hi, lo, final && last);
        if (EVP_CipherInit_ex2(ctx, NULL, NULL, nonce, enc, NULL) != 1) {
            return -2;
        }
        outl = 0;
        /* an empty final chunk is a tag alone: there is nothing to update with */
        if (len > 0 && (EVP_CipherUpdate(ctx, dst, &outl, src, (int)len) != 1
                        || outl != (int)len)) {
            return -2;
        }
        if (enc) {
            if (EVP_CipherFinal_ex(ctx, dst + outl, &finl) != 1
                || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN,
                                       dst + len) != 1) {
                return -2;
            }
            src += len;
            dst += len + TAG_LEN;
        }
        else {
            memcpy(tag, src + len, TAG_LEN);
            if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, tag) != 1) {
                return -2;
            }
            /* EVP compares the tag (in constant time); a mismatch fails the final. */
            if (EVP_CipherFinal_ex(ctx, dst + outl, &finl) != 1) {
                OPENSSL_cleanse(dst, (size_t)len);
                ERR_clear_error();
                return i;
            }
            src += len + TAG_LEN;
            dst += len;
        }
    }
    return -1;
}

static PyObject *
chunks(PyObject *args, PyObject *kwds, int enc)
{
    static char *kwlist[] = {"key", "src", "dst", "counter", "final", "chunk_size", NULL};
    const char *fmt = enc ? "y*y*O|$Opn:seal_chunks" : "y*y*O|$Opn:open_chunks";
    const char *dst_message = enc
        ? "dst must be writable and hold every chunk and its tag"
        : "dst must be writable and hold every chunk's plaintext";
    Py_buffer key, src, dst;
    PyObject *dst_obj, *counter = NULL, *result = NULL;
    int final = -1;
    Py_ssize_t chunk_size = 65536, unit, count = 0, tail = 0, need, written, failed;
    uint32_t hi = 0;
    uint64_t lo = 0;
    unsigned char material[KEY_LEN];
    EVP_CIPHER_CTX *ctx = NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, fmt, kwlist, &key, &src, &dst_obj,
                                     &counter, &final, &chunk_size)) {
        return NULL;
    }
    dst.obj = NULL;
    if (counter == NULL || final < 0) {
        PyErr_Format(PyExc_TypeError, "%s() missing required keyword-only argument: '%s'",
                     enc ? "seal_chunks" : "open_chunks",
                     counter == NULL ? "counter" : "final");
        goto done;
    }
    /* Checked first here: the layout below divides by it. */
    if (chunk_size <= 0) {
        PyErr_SetString(InvalidRequest, "chunk_size must be positive");
        goto done;
    }
    if (chunk_size > INT_MAX - TAG_LEN) {
        /* EVP counts in ints; the fallback has no such limit, but nobody needs 2 GiB */
        PyErr_SetString(InvalidRequest, "chunk_size must be below 2**31 - 16");
        goto done;
    }
    /* Writability is checked with the size below, in the fallback's order. */
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_C_CONTIGUOUS) != 0) {
        dst.obj = NULL;
        goto done;
    }
    unit = enc ? chunk_size : chunk_size + TAG_LEN;
    if (layout(src.len, unit, final, enc ? 0 : TAG_LEN, &count, &tail) != 0) {
        goto done;
    }
    if (!enc) {
        tail -= TAG_LEN; /* from here on, tail counts plaintext bytes */
    }
    if (key.len != KEY_LEN) {
        PyErr_SetString(InvalidRequest, "a STREAM key is 32 bytes");
        goto done;
    }
    if (split_counter(counter, count, &hi, &lo) != 0) {
        goto done;
    }
    need = enc ? src.len + TAG_LEN * count : src.len - TAG_LEN * count;
    if (dst.readonly || dst.len < need) {
        PyErr_SetString(InvalidRequest, dst_message);
        goto done;
    }
    if (src.len > 0 && (const char *)dst.buf < (const char *)src.buf + src.len
        && (const char *)src.buf < (const char *)dst.buf + need) {
        PyErr_SetString(InvalidRequest, "dst must not overlap src");
        goto done;
    }
    /* Private copy of the key, keyed into a context of this call's own. */
    memcpy(material, key.buf, KEY_LEN);
    ERR_clear_error();
    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL || EVP_CipherInit_ex2(ctx, chacha, material, NULL, enc, NULL) != 1) {
        OPENSSL_cleanse(material, sizeof(material));
        raise_openssl(PyExc_RuntimeError, "OpenSSL rejected the ChaCha20-Poly1305 key");
        goto done;
    }
    OPENSSL_cleanse(material, sizeof(material));

    Py_BEGIN_ALLOW_THREADS
    failed = run(ctx, enc, (const unsigned char *)src.buf, (unsigned char *)dst.buf,
                 count, chunk_size, tail, final, hi, lo);
    Py_END_ALLOW_THREADS

    if (failed == -2) {
        raise_openssl(PyExc_RuntimeError, enc ? "ChaCha20-Poly1305 encryption failed"
                                              : "ChaCha20-Poly1305 decryption failed");
        goto done;
    }
    if (failed >= 0) {
        PyObject *exc = PyObject_CallFunction(ChunkAuthFailed, "n", failed);
        if (exc != NULL) {
            PyErr_SetObject(ChunkAuthFailed, exc);
            Py_DECREF(exc);
        }
        goto done;
    }
    written = need;
    result = PyLong_FromSsize_t(written);
done:
    EVP_CIPHER_CTX_free(ctx); /* cleanses the key state */
    if (dst.obj != NULL) {
        PyBuffer_Release(&dst);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&key);
    return result;
}

static PyObject *
seal_chunks(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwds)
{
    return chunks(args, kwds, 1);
}

static PyObject *
open_chunks(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwds)
{
    return chunks(args, kwds, 0);
}

static PyObject *
openssl_version(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromString(OpenSSL_version(OPENSSL_VERSION));
}

PyDoc_STRVAR(seal_doc,
"seal_chunks(key, src, dst, *, counter, final, chunk_size=65536)\n--\n\n"
"Seal src as STREAM chunks numbered from counter into dst (chunk || tag each);\n"
"with final the last chunk is src's tail and carries the final flag.\n"
"Returns the bytes written. The GIL is released for the whole batch.");

PyDoc_STRVAR(open_doc,
"open_chunks(key, src, dst, *, counter, final, chunk_size=65536)\n--\n\n"
"Open STREAM chunks (chunk_size + 16 bytes each; with final the last is src's tail)\n"
"into dst; raises ChunkAuthenticationFailed(index) for a chunk whose tag fails.\n"
"Returns the bytes written. The GIL is released for the whole batch.");

static PyMethodDef module_methods[] = {
    {"seal_chunks", (PyCFunction)(void (*)(void))seal_chunks, METH_VARARGS | METH_KEYWORDS,
     seal_doc},
    {"open_chunks", (PyCFunction)(void (*)(void))open_chunks, METH_VARARGS | METH_KEYWORDS,
     open_doc},
    {"openssl_version", openssl_version, METH_NOARGS,
     "openssl_version()\n--\n\nThe version string of the libcrypto in use."},
    {NULL, NULL, 0, NULL},
};

static void
module_free(void *Py_UNUSED(module))
{
    EVP_CIPHER_free(chacha);
    chacha = NULL;
    Py_CLEAR(ChunkAuthFailed);
    Py_CLEAR(InvalidRequest);
    Py_CLEAR(MaxCounter);
}

static struct PyModuleDef chunks_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_chunks",
    .m_doc = "age STREAM chunks (ChaCha20-Poly1305) via OpenSSL EVP, with the GIL released.",
    .m_size = -1,
    .m_methods = module_methods,
    .m_free = module_free,
};

static PyObject *
import_attr(const char *module, const char *name)
{
    PyObject *mod = PyImport_ImportModule(module), *attr;
    if (mod == NULL) {
        return NULL;
    }
    attr = PyObject_GetAttrString(mod, name);
    Py_DECREF(mod);
    return attr;
}

PyMODINIT_FUNC
PyInit__chunks(void)
{
    PyObject *m;

    if (chacha == NULL) {
        chacha = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
        if (chacha == NULL) {
            return raise_openssl(PyExc_ImportError,
                                 "libcrypto provides no ChaCha20-Poly1305 (FIPS-only "
                                 "provider?)");
        }
    }
    /* The fallback's classes, so that either backend raises the very same types. */
    if (ChunkAuthFailed == NULL) {
        ChunkAuthFailed = import_attr("cryptoplane._native.chunks_fallback",
                                      "ChunkAuthenticationFailed");
        InvalidRequest = import_attr("cryptoplane.exceptions", "InvalidRequest");
        MaxCounter = PyLong_FromString("309485009821345068724781056", NULL, 10);
        if (ChunkAuthFailed == NULL || InvalidRequest == NULL || MaxCounter == NULL) {
            module_free(NULL);
            return NULL;
        }
    }
    m = PyModule_Create(&chunks_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "TAG", TAG_LEN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
