/*
 * The batch methods of cryptoplane._native._sectors.XtsKey: many runs in one call (an
 * NBD server's requests of one receive), apart from the single-run type in sectors.c.
 *
 * Per request, the Python around a 4 KiB run costs far more than the cipher (~1-2 us);
 * a batch pays the argument parsing and the GIL hand-off once.  Items are
 * (offset, first_sector, buffer) tuples: for a gather, `offset` is where the run's
 * ciphertext lies in `src` (the image mapping) and the buffer receives the plaintext;
 * for a scatter, the buffer holds plaintext that is encrypted into `scratch` and
 * written to `fd` at `offset`, in item order (so overlapping writes keep their order).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <unistd.h>

#include <openssl/err.h>

#include "openssl_error.h"
#include "sectors.h"
#include "xts_ctx.h"

/* One item, its buffer held until the call ends (the GIL is released meanwhile). */
typedef struct {
    Py_buffer view;
    unsigned long long offset, first;
} BatchItem;

static void
batch_free(BatchItem *items, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        PyBuffer_Release(&items[i].view);
    }
    PyMem_Free(items);
}

/* Parse the item list; NULL with an exception set on any bad item. */
static BatchItem *
batch_parse(PyObject *list, int writable, int sector_size, Py_ssize_t *count)
{
    PyObject *seq = PySequence_Fast(list, "items must be a sequence of tuples");
    Py_ssize_t n, i, got = 0;
    BatchItem *items = NULL;
    if (seq == NULL) {
        return NULL;
    }
    n = PySequence_Fast_GET_SIZE(seq);
    items = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(BatchItem));
    if (items == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (i = 0; i < n; i++) {
        PyObject *off, *first, *buf;
        BatchItem *it = &items[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "OOO:item", &off, &first,
                              &buf)) {
            goto fail;
        }
        /* Not "K": it takes a negative or too big number modulo 2**64, silently. */
        it->offset = PyLong_AsUnsignedLongLong(off);
        if (it->offset == (unsigned long long)-1 && PyErr_Occurred()) {
            goto fail;
        }
        it->first = PyLong_AsUnsignedLongLong(first);
        if (it->first == (unsigned long long)-1 && PyErr_Occurred()) {
            goto fail;
        }
        if (PyObject_GetBuffer(buf, &it->view, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS
                                                          : PyBUF_C_CONTIGUOUS) != 0) {
            PyErr_Format(PyExc_TypeError, "item %zd: a %s bytes-like buffer is needed, not %s",
                         i, writable ? "writable, contiguous" : "contiguous",
                         Py_TYPE(buf)->tp_name);
            goto fail;
        }
        got++;
        if (it->view.len == 0 || it->view.len % sector_size != 0) {
            PyErr_Format(PyExc_ValueError, "item %zd: %zd bytes is not a non-zero multiple "
                         "of the sector size %d", i, it->view.len, sector_size);
            goto fail;
        }
    }
    Py_DECREF(seq);
    *count = n;
    return items;
fail:
    Py_DECREF(seq);
    if (items != NULL) {
        batch_free(items, got);
    }
    return NULL;
}

static int
batch_check_args(int sector_size, int tweak)
{
    if (sector_size != 512 && sector_size != 1024 && sector_size != 2048
        && sector_size != 4096) {
        PyErr_Format(PyExc_ValueError, "sector_size must be 512, 1024, 2048 or 4096, got %d",
                     sector_size);
        return -1;
    }
    if (!TWEAK_VALID(tweak)) {
        PyErr_Format(PyExc_ValueError, "bad tweak code %d", tweak);
        return -1;
    }
    return 0;
}

PyObject *
XtsKey_decrypt_gather(XtsKeyObject *self, PyObject *args)
{
    Py_buffer src;
    PyObject *list;
    BatchItem *items;
    Py_ssize_t n = 0, i, total = 0;
    int sector_size, tweak, ok = 1, faulted = 0;
    void *ctx;

    if (self->tmpl[0] == NULL) {
        PyErr_SetString(PyExc_TypeError, "XtsKey is not initialised");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*Oii:decrypt_gather", &src, &list, &sector_size, &tweak)) {
        return NULL;
    }
    if (batch_check_args(sector_size, tweak) != 0
        || (items = batch_parse(list, 1, sector_size, &n)) == NULL) {
        PyBuffer_Release(&src);
        return NULL;
    }
    for (i = 0; i < n; i++) {
        if (items[i].offset > (unsigned long long)src.len
            || (unsigned long long)items[i].view.len > (unsigned long long)src.len - items[i].offset) {
            PyErr_Format(PyExc_ValueError, "item %zd lies outside the source", i);
            goto fail;
        }
        total += items[i].view.len;
    }
    ctx = n ? ctx_acquire(self, 0) : NULL;
    if (n && ctx == NULL) {
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    ERR_clear_error();
    for (i = 0; i < n && ok && !faulted; i++) {
        faulted = run_guarded(self->direct, self->size, 0, ctx,
                              (const unsigned char *)src.buf + items[i].offset,
                              (unsigned char *)items[i].view.buf,
                              (size_t)(items[i].view.len / sector_size), sector_size,
                              (uint64_t)items[i].first, tweak, &ok);
    }
    Py_END_ALLOW_THREADS
    if (faulted || !ok) {
        xts_ctx_free(self->direct, self->size, ctx);
        if (faulted) {
            errno = EIO;
            PyErr_SetFromErrno(PyExc_OSError);
        }
        else {
            raise_openssl(PyExc_RuntimeError, "AES-XTS decryption failed");
        }
        goto fail;
    }
    if (ctx != NULL) {
        ctx_release(self, 0, ctx);
    }
    batch_free(items, n);
    PyBuffer_Release(&src);
    return PyLong_FromSsize_t(total);
fail:
    batch_free(items, n);
    PyBuffer_Release(&src);
    return NULL;
}

PyObject *
XtsKey_encrypt_scatter(XtsKeyObject *self, PyObject *args)
{
    Py_buffer scratch;
    PyObject *list;
    BatchItem *items;
    Py_ssize_t n = 0, i, done = 0, written = 0;
    int fd, sector_size, tweak, ok = 1, err = 0;
    void *ctx;

    if (self->tmpl[1] == NULL) {
        PyErr_SetString(PyExc_TypeError, "XtsKey is not initialised");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "iOiiw*:encrypt_scatter", &fd, &list, &sector_size, &tweak,
                          &scratch)) {
        return NULL;
    }
    if (batch_check_args(sector_size, tweak) != 0
        || (items = batch_parse(list, 0, sector_size, &n)) == NULL) {
        PyBuffer_Release(&scratch);
        return NULL;
    }
    for (i = 0; i < n; i++) {
        if (items[i].view.len > scratch.len || items[i].offset > (unsigned long long)INT64_MAX) {
            PyErr_Format(PyExc_ValueError, "item %zd is longer than the scratch buffer", i);
            goto fail;
        }
    }
    ctx = n ? ctx_acquire(self, 1) : NULL;
    if (n && ctx == NULL) {
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    ERR_clear_error();
    for (i = 0; i < n; i++) {
        size_t len = (size_t)items[i].view.len, put = 0;
        ok = xts_run(self->direct, self->size, 1, ctx, (const unsigned char *)items[i].view.buf,
                     (unsigned char *)scratch.buf, len / (size_t)sector_size, sector_size,
                     (uint64_t)items[i].first, tweak);
        if (!ok) {
            break;
        }
        while (put < len) {
            ssize_t w = pwrite(fd, (unsigned char *)scratch.buf + put, len - put,
                               (off_t)(items[i].offset + put));
            if (w < 0) {
                if (errno == EINTR) {
                    continue;
                }
                err = errno;
                break;
            }
            if (w == 0) {
                err = EIO;
                break;
            }
            put += (size_t)w;
        }
        if (err) {
            break;
        }
        done++;
        written += (Py_ssize_t)len;
    }
    Py_END_ALLOW_THREADS
    if (!ok) {
        xts_ctx_free(self->direct, self->size, ctx);
        raise_openssl(PyExc_RuntimeError, "AES-XTS encryption failed");
        goto fail;
    }
    if (ctx != NULL) {
        ctx_release(self, 1, ctx);
    }
    batch_free(items, n);
    PyBuffer_Release(&scratch);
    return Py_BuildValue("(nin)", done, err, written);
fail:
    batch_free(items, n);
    PyBuffer_Release(&scratch);
    return NULL;
}
