/*
 * The C ABI of include/lipforcing.h, over the Python session: CPython is embedded (or joined, when the host
 * is Python) and lipforcing.engine.app.native.NativeSession does the work. Every entry point takes the GIL
 * for the length of its call only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lipforcing.h"

#ifndef LF_DEFAULT_PYTHON
#define LF_DEFAULT_PYTHON ""
#endif

#define LF_MAX_SIDE 16384

struct lf_session {
    PyObject *obj; /* a NativeSession */
};

static _Thread_local char error_message[2048];

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int init_status = LF_OK;
static char init_error[2048];
static PyObject *session_class, *state_error, *config_error, *media_error, *lipforcing_error;

static int fail(int status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(error_message, sizeof error_message, fmt, args);
    va_end(args);
    return status;
}

/* The pending Python exception as a status and this thread's message (the GIL is held). */
static int python_failure(void) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    int status = LF_ERR_INTERNAL;
    if (type && state_error && PyErr_GivenExceptionMatches(type, state_error)) status = LF_ERR_STATE;
    else if (type && media_error && PyErr_GivenExceptionMatches(type, media_error)) status = LF_ERR_MEDIA;
    else if (type && lipforcing_error && PyErr_GivenExceptionMatches(type, lipforcing_error)) status = LF_ERR_CONFIG;
    const char *text = NULL;
    PyObject *str = value ? PyObject_Str(value) : NULL;
    if (str) text = PyUnicode_AsUTF8(str);
    if (!text) {
        PyErr_Clear();
        text = "unknown error";
    }
    if (status == LF_ERR_INTERNAL && type) {
        const char *name = ((PyTypeObject *)type)->tp_name;
        fail(status, "%s: %s", name ? name : "error", text);
    } else {
        fail(status, "%s", text);
    }
    Py_XDECREF(str);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return status;
}

static PyObject *attribute(const char *module_name, const char *name) {
    PyObject *module = PyImport_ImportModule(module_name);
    if (!module) return NULL;
    PyObject *value = PyObject_GetAttrString(module, name);
    Py_DECREF(module);
    return value;
}

static void start_python(void) {
    int started_here = 0;
    if (!Py_IsInitialized()) {
        PyConfig config;
        PyConfig_InitPythonConfig(&config);
        config.install_signal_handlers = 0; /* the host owns its signals */
        config.parse_argv = 0;
        const char *python = getenv("LIPFORCING_PYTHON");
        if (!python || !*python) python = LF_DEFAULT_PYTHON;
        PyStatus status = PyStatus_Ok();
        if (python && *python) status = PyConfig_SetBytesString(&config, &config.program_name, python);
        if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
        PyConfig_Clear(&config);
        if (PyStatus_Exception(status)) {
            init_status = LF_ERR_PYTHON;
            snprintf(init_error, sizeof init_error, "cannot start Python: %s",
                     status.err_msg ? status.err_msg : "unknown error");
            return;
        }
        started_here = 1;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    session_class = attribute("lipforcing.engine.app.native", "NativeSession");
    if (session_class) state_error = attribute("lipforcing.engine.app.native", "StateError");
    if (state_error) media_error = attribute("lipforcing.engine.errors", "MediaError");
    if (media_error) config_error = attribute("lipforcing.engine.errors", "ConfigError");
    if (config_error) lipforcing_error = attribute("lipforcing.engine.errors", "LipforcingError");
    if (!lipforcing_error) {
        python_failure();
        init_status = LF_ERR_PYTHON;
        snprintf(init_error, sizeof init_error,
                 "cannot load the lipforcing package (%.1500s); set LIPFORCING_PYTHON to the python of an "
                 "environment where it is installed",
                 error_message);
    }
    PyGILState_Release(gil);
    if (started_here) PyEval_SaveThread(); /* let go of the GIL the initialisation took */
}

static int ready(void) {
    pthread_once(&init_once, start_python);
    if (init_status != LF_OK) return fail(init_status, "%s", init_error);
    return LF_OK;
}

const char *lf_version(void) { return "0.1.0"; }

int lf_version_number(void) { return LF_VERSION_MAJOR * 10000 + LF_VERSION_MINOR * 100 + LF_VERSION_PATCH; }

const char *lf_last_error(void) { return error_message; }

const char *lf_status_name(int status) {
    switch (status) {
        case LF_OK: return "LF_OK";
        case LF_END: return "LF_END";
        case LF_TIMEOUT: return "LF_TIMEOUT";
        case LF_ERR_ARGUMENT: return "LF_ERR_ARGUMENT";
        case LF_ERR_STATE: return "LF_ERR_STATE";
        case LF_ERR_CONFIG: return "LF_ERR_CONFIG";
        case LF_ERR_MEDIA: return "LF_ERR_MEDIA";
        case LF_ERR_PYTHON: return "LF_ERR_PYTHON";
        case LF_ERR_INTERNAL: return "LF_ERR_INTERNAL";
        default: return "LF_UNKNOWN_STATUS";
    }
}

void lf_config_init(lf_config *config) {
    if (config) memset(config, 0, sizeof *config);
}

static int put_string(PyObject *dict, const char *key, const char *value) {
    if (!value) return 0;
    PyObject *item = PyUnicode_FromString(value);
    if (!item) return -1;
    int rc = PyDict_SetItemString(dict, key, item);
    Py_DECREF(item);
    return rc;
}

static int put_number(PyObject *dict, const char *key, PyObject *item) {
    if (!item) return -1;
    int rc = PyDict_SetItemString(dict, key, item);
    Py_DECREF(item);
    return rc;
}

int lf_create(const lf_config *config, lf_session **out) {
    error_message[0] = 0;
    if (!config || !out) return fail(LF_ERR_ARGUMENT, "lf_create: config and out must not be NULL");
    *out = NULL;
    if (config->lookahead < 0) return fail(LF_ERR_ARGUMENT, "lf_create: lookahead must not be negative");
    if (config->max_sessions < 0) return fail(LF_ERR_ARGUMENT, "lf_create: max_sessions must not be negative");
    int status = ready();
    if (status != LF_OK) return status;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *dict = PyDict_New();
    PyObject *obj = NULL;
    if (dict && put_string(dict, "model", config->model) == 0 && put_string(dict, "ckpt", config->ckpt) == 0 &&
        put_string(dict, "vae", config->vae) == 0 && put_string(dict, "taehv", config->taehv) == 0 &&
        put_string(dict, "wav2vec", config->wav2vec) == 0 &&
        put_string(dict, "text_embeds", config->text_embeds) == 0 &&
        put_string(dict, "device", config->device) == 0 && put_string(dict, "dtype", config->dtype) == 0 &&
        put_string(dict, "encoder", config->encoder) == 0 && put_string(dict, "decoder", config->decoder) == 0 &&
        put_string(dict, "backend", config->backend) == 0 &&
        put_number(dict, "live", PyLong_FromLong(config->live ? 1 : 0)) == 0 &&
        put_number(dict, "seed", PyLong_FromLong(config->seed)) == 0 &&
        put_number(dict, "max_sessions", PyLong_FromLong(config->max_sessions > 0 ? config->max_sessions : 1)) == 0 &&
        (config->lookahead <= 0 || put_number(dict, "lookahead", PyFloat_FromDouble(config->lookahead)) == 0)) {
        obj = PyObject_CallOneArg(session_class, dict);
    }
    if (!obj) status = python_failure();
    Py_XDECREF(dict);
    PyGILState_Release(gil);
    if (!obj) return status;
    lf_session *session = (lf_session *)calloc(1, sizeof *session);
    if (!session) {
        gil = PyGILState_Ensure();
        Py_DECREF(obj);
        PyGILState_Release(gil);
        return fail(LF_ERR_INTERNAL, "lf_create: out of memory");
    }
    session->obj = obj;
    *out = session;
    return LF_OK;
}

/* Call a method of the session (format as Py_BuildValue); the result, or NULL with the status in *status. */
static PyObject *call(lf_session *session, const char *method, int *status, const char *format, ...) {
    va_list args;
    va_start(args, format);
    PyObject *arguments = Py_VaBuildValue(format, args);
    va_end(args);
    PyObject *result = NULL;
    if (arguments) {
        PyObject *function = PyObject_GetAttrString(session->obj, method);
        if (function) {
            result = PyObject_CallObject(function, arguments);
            Py_DECREF(function);
        }
        Py_DECREF(arguments);
    }
    if (!result) *status = python_failure();
    return result;
}

int lf_push_speech(lf_session *session, const float *samples, size_t count, int sample_rate) {
    error_message[0] = 0;
    if (!session) return fail(LF_ERR_ARGUMENT, "lf_push_speech: session is NULL");
    if (!samples && count) return fail(LF_ERR_ARGUMENT, "lf_push_speech: samples is NULL");
    if (sample_rate <= 0) return fail(LF_ERR_ARGUMENT, "lf_push_speech: sample rate must be positive, got %d",
                                      sample_rate);
    if (count > (size_t)PY_SSIZE_T_MAX / sizeof(float)) return fail(LF_ERR_ARGUMENT, "lf_push_speech: too many samples");
    int status = LF_OK;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = call(session, "push_speech", &status, "(y#i)", (const char *)samples,
                            (Py_ssize_t)(count * sizeof(float)), sample_rate);
    Py_XDECREF(result);
    PyGILState_Release(gil);
    return status;
}

/* A method of the session without arguments, for the entry point `api`. */
static int call_plain(lf_session *session, const char *api, const char *method) {
    error_message[0] = 0;
    if (!session) return fail(LF_ERR_ARGUMENT, "%s: session is NULL", api);
    int status = LF_OK;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = call(session, method, &status, "()");
    Py_XDECREF(result);
    PyGILState_Release(gil);
    return status;
}

int lf_end_speech(lf_session *session) { return call_plain(session, "lf_end_speech", "end_speech"); }

int lf_push_frame(lf_session *session, const uint8_t *rgb, int width, int height, size_t stride) {
    error_message[0] = 0;
    if (!session) return fail(LF_ERR_ARGUMENT, "lf_push_frame: session is NULL");
    if (!rgb) return fail(LF_ERR_ARGUMENT, "lf_push_frame: rgb is NULL");
    if (width <= 0 || height <= 0 || width > LF_MAX_SIDE || height > LF_MAX_SIDE)
        return fail(LF_ERR_ARGUMENT, "lf_push_frame: a frame of %dx%d (each side must be 1..%d)", width, height,
                    LF_MAX_SIDE);
    if (stride < (size_t)width * 3)
        return fail(LF_ERR_ARGUMENT, "lf_push_frame: stride %zu is less than 3 x width (%d)", stride, width * 3);
    size_t size = stride * (size_t)(height - 1) + (size_t)width * 3;
    int status = LF_OK;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *view = PyMemoryView_FromMemory((char *)rgb, (Py_ssize_t)size, PyBUF_READ);
    PyObject *result = NULL;
    if (view) {
        result = call(session, "push_frame", &status, "(Oiin)", view, width, height, (Py_ssize_t)stride);
        Py_DECREF(view);
    } else {
        status = python_failure();
    }
    Py_XDECREF(result);
    PyGILState_Release(gil);
    return status;
}

/* One pop attempt; LF_OK fills *out. */
static int pop_once(lf_session *session, lf_frame *out, double timeout_s) {
    int status = LF_OK;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = call(session, "pop", &status, "(d)", timeout_s);
    if (result) {
        if (result == Py_None) {
            status = LF_TIMEOUT;
        } else if (PyUnicode_Check(result)) {
            status = LF_END;
        } else {
            long long index = 0;
            const char *bytes = NULL;
            Py_ssize_t size = 0;
            int width = 0, height = 0;
            if (!PyArg_ParseTuple(result, "Ly#ii", &index, &bytes, &size, &width, &height)) {
                status = python_failure();
            } else if (size != (Py_ssize_t)width * height * 3) {
                status = fail(LF_ERR_INTERNAL, "lf_pop_frame: a frame of %zd bytes is not %dx%dx3", size, width, height);
            } else {
                uint8_t *data = (uint8_t *)malloc((size_t)size);
                if (!data) {
                    status = fail(LF_ERR_INTERNAL, "lf_pop_frame: out of memory");
                } else {
                    memcpy(data, bytes, (size_t)size);
                    out->data = data;
                    out->width = width;
                    out->height = height;
                    out->stride = (size_t)width * 3;
                    out->index = index;
                }
            }
        }
        Py_DECREF(result);
    }
    PyGILState_Release(gil);
    return status;
}

int lf_pop_frame(lf_session *session, lf_frame *out, int timeout_ms) {
    error_message[0] = 0;
    if (!session || !out) return fail(LF_ERR_ARGUMENT, "lf_pop_frame: session and out must not be NULL");
    memset(out, 0, sizeof *out);
    if (timeout_ms >= 0) return pop_once(session, out, timeout_ms / 1000.0);
    for (;;) { /* wait until a frame or the end, taking the GIL half a second at a time */
        int status = pop_once(session, out, 0.5);
        if (status != LF_TIMEOUT) return status;
    }
}

void lf_frame_release(lf_frame *frame) {
    if (!frame) return;
    free(frame->data);
    memset(frame, 0, sizeof *frame);
}

int lf_close(lf_session *session) { return call_plain(session, "lf_close", "close"); }

void lf_destroy(lf_session *session) {
    if (!session) return;
    PyGILState_STATE gil = PyGILState_Ensure();
    int status = LF_OK;
    PyObject *result = call(session, "destroy", &status, "()");
    Py_XDECREF(result);
    if (!result) PyErr_Clear();
    Py_DECREF(session->obj);
    PyGILState_Release(gil);
    free(session);
}
