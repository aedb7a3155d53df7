/*
 * OpenSSL's errors as Python exceptions, for the native modules (sectors.c, chunks.c).
 * Each module is its own shared object, so the one definition is static in each.
 */
#ifndef CRYPTOPLANE_OPENSSL_ERROR_H
#define CRYPTOPLANE_OPENSSL_ERROR_H

#include <Python.h>

#include <openssl/err.h>

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

#endif
