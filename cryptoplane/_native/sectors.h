/*
 * What the XtsKey type (sectors.c) shares with its batch methods (sectors_batch.c): the
 * object layout, the per-call context pool and the SIGBUS-guarded run.  Both files are
 * one extension built with -fvisibility=hidden, so these names stay inside the .so.
 */
#ifndef CRYPTOPLANE_SECTORS_H
#define CRYPTOPLANE_SECTORS_H

#ifndef PY_SSIZE_T_CLEAN
#define PY_SSIZE_T_CLEAN
#endif
#include <Python.h>

#include <stddef.h>
#include <stdint.h>

/*
 * Idle per-call contexts kept by a key.  Enough for a thread pool of a few workers on a
 * small machine; callers beyond that get a fresh copy that is freed after the call,
 * which is still correct, only a little slower.
 */
#define CTX_POOL_MAX 8

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
    int size; /* 0: AES-128-XTS, 1: AES-256-XTS */
    int direct;
#ifdef Py_GIL_DISABLED
    PyMutex pool_lock;
#endif
} XtsKeyObject;

/* A context ready for one call (with the GIL held); NULL with an exception set. */
void *ctx_acquire(XtsKeyObject *self, int enc);
/* Give a context back to the pool after a successful call (with the GIL held). */
void ctx_release(XtsKeyObject *self, int enc, void *ctx);

/* xts_run, with a SIGBUS in it turned into a return of -1 (else 0, and *ok is set). */
int run_guarded(int direct, int size, int enc, void *ctx, const unsigned char *src,
                unsigned char *dst, size_t nsectors, int sector_size, uint64_t first,
                int tweak, int *ok);

/* The batch methods (sectors_batch.c), listed in sectors.c's method table. */
PyObject *XtsKey_decrypt_gather(XtsKeyObject *self, PyObject *args);
PyObject *XtsKey_encrypt_scatter(XtsKeyObject *self, PyObject *args);

#endif
