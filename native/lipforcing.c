/*
 * The C ABI of include/lipforcing.h, over the Python session: CPython is embedded (or joined, when the host
 * is Python) and lipforcing.engine.app.native.NativeSession does the work. Every entry point checks its
 * arguments in C first, then takes the GIL for the length of its call only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lipforcing.h"

#ifndef LF_DEFAULT_PYTHON
#define LF_DEFAULT_PYTHON ""
#endif
#if defined(LF_SOVERSION) && LF_SOVERSION != LF_ABI_VERSION
#error "the library's SOVERSION must be LF_ABI_VERSION"
#endif

#define LF_MAGIC 0x6c667331u        /* "lfs1": a session */
#define LF_ENGINE_MAGIC 0x6c666531u /* "lfe1": an engine */
#define LF_POP_SLICE_S 0.1   /* a waiting pop takes the GIL this often, and sees lf_cancel within it */

struct lf_engine {
    uint32_t magic;    /* first, as in lf_session: the live set checks it */
    PyObject *obj;     /* a NativeEngine */
};

struct lf_session {
    uint32_t magic;
    PyObject *obj;             /* a NativeSession */
    atomic_int cancel_pending; /* lf_cancel: the next (or current) pop returns LF_CANCELLED */
};

static _Thread_local char error_message[2048];

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int init_status = LF_OK;
static char init_error[2048];
static PyObject *engine_class, *session_class, *state_error, *argument_error, *config_error, *media_error, *lipforcing_error;

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static lf_log_callback log_callback;
static void *log_user;

/* ---- errors ------------------------------------------------------------------------------------------- */

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
    else if (type && argument_error && PyErr_GivenExceptionMatches(type, argument_error)) status = LF_ERR_ARGUMENT;
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

/* ---- live handles: a destroyed or foreign pointer is refused before it is read ------------------------ */

static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
static const void **live_handles; /* sessions and engines */
static size_t live_count, live_capacity;

static int live_add(const void *handle) {
    pthread_mutex_lock(&live_lock);
    int ok = 1;
    if (live_count == live_capacity) {
        size_t capacity = live_capacity ? 2 * live_capacity : 16;
        const void **grown = (const void **)realloc(live_handles, capacity * sizeof *grown);
        if (grown) live_handles = grown, live_capacity = capacity;
        else ok = 0;
    }
    if (ok) live_handles[live_count++] = handle;
    pthread_mutex_unlock(&live_lock);
    return ok;
}

/* Whether `handle` is live and of the kind `magic`; with `remove`, it is taken out of the set (destroy). */
static int live_find(const void *handle, uint32_t magic, int remove) {
    pthread_mutex_lock(&live_lock);
    int found = 0;
    for (size_t i = 0; i < live_count; i++) {
        if (live_handles[i] == handle) {
            found = *(const uint32_t *)handle == magic;
            if (found && remove) live_handles[i] = live_handles[--live_count];
            break;
        }
    }
    pthread_mutex_unlock(&live_lock);
    return found;
}

/* LF_OK for a live session, else the status and this thread's message, for the entry point `api`. */
static int check_session(const lf_session *session, const char *api) {
    if (!session) return fail(LF_ERR_ARGUMENT, "%s: session is NULL", api);
    if (!live_find(session, LF_MAGIC, 0))
        return fail(LF_ERR_MISUSE, "%s: the session is not live (destroyed already, or not made by lf_create)", api);
    return LF_OK;
}

/* ---- the interpreter ---------------------------------------------------------------------------------- */

/* Python's stdout and stderr, a line at a time (level 0: stdout, 1: stderr): the callback, or our stderr. */
static PyObject *log_line(PyObject *self, PyObject *args) {
    int level = 1;
    const char *line = NULL;
    if (!PyArg_ParseTuple(args, "is", &level, &line)) return NULL;
    pthread_mutex_lock(&log_lock);
    lf_log_callback callback = log_callback;
    void *user = log_user;
    pthread_mutex_unlock(&log_lock);
    if (callback) {
        callback(level, line, user);
    } else {
        fputs(line, stderr);
        fputc('\n', stderr);
    }
    Py_RETURN_NONE;
}

static PyMethodDef log_line_def = {"lf_log_line", log_line, METH_VARARGS, "one line of Python's output"};

static PyObject *attribute(const char *module_name, const char *name) {
    PyObject *module = PyImport_ImportModule(module_name);
    if (!module) return NULL;
    PyObject *value = PyObject_GetAttrString(module, name);
    Py_DECREF(module);
    return value;
}

/* Python's stdout and stderr to log_line (the GIL is held): never the host's stdout. */
static int redirect_output(void) {
    if (PySys_SetObject("stdout", PySys_GetObject("stderr")) < 0) return -1; /* until the streams are in */
    PyObject *install = attribute("lipforcing.engine.app.native", "redirect_output");
    PyObject *sink = install ? PyCFunction_New(&log_line_def, NULL) : NULL;
    PyObject *done = sink ? PyObject_CallOneArg(install, sink) : NULL;
    Py_XDECREF(install);
    Py_XDECREF(sink);
    Py_XDECREF(done);
    return done ? 0 : -1;
}

static int start_interpreter(void) {
    PyPreConfig preconfig;
    PyPreConfig_InitIsolatedConfig(&preconfig);
    preconfig.utf8_mode = 1; /* paths and messages as UTF-8 whatever the locale (env -i gives "C") */
    PyStatus status = Py_PreInitialize(&preconfig);
    PyConfig config;
    PyConfig_InitIsolatedConfig(&config); /* no PYTHON* variable, no user site, no current folder on the path */
    config.install_signal_handlers = 0;   /* the host owns its signals */
    config.parse_argv = 0;
    config.site_import = 1; /* the environment's site-packages (pyvenv.cfg next to the program) */
    const char *python = getenv("LIPFORCING_PYTHON");
    if (!python || !*python) python = LF_DEFAULT_PYTHON;
    if (!PyStatus_Exception(status) && *python)
        status = PyConfig_SetBytesString(&config, &config.program_name, python);
    if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        init_status = LF_ERR_PYTHON;
        snprintf(init_error, sizeof init_error, "cannot start Python (%s): %s", *python ? python : "built-in",
                 status.err_msg ? status.err_msg : "unknown error");
        return -1;
    }
    return 0;
}

static void start_python(void) {
    int started_here = 0;
    if (!Py_IsInitialized()) {
        if (start_interpreter() < 0) return;
        started_here = 1;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    int ok = !started_here || redirect_output() == 0;
    if (ok) engine_class = attribute("lipforcing.engine.app.native", "NativeEngine");
    if (engine_class) session_class = attribute("lipforcing.engine.app.native", "NativeSession");
    if (session_class) state_error = attribute("lipforcing.engine.app.native", "StateError");
    if (state_error) argument_error = attribute("lipforcing.engine.app.native", "ArgumentError");
    if (argument_error) media_error = attribute("lipforcing.engine.errors", "MediaError");
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

void lf_set_log_callback(lf_log_callback callback, void *user) {
    pthread_mutex_lock(&log_lock);
    log_callback = callback;
    log_user = user;
    pthread_mutex_unlock(&log_lock);
}

/* ---- versions, configuration -------------------------------------------------------------------------- */

#define LF_TEXT_(x) #x
#define LF_TEXT(x) LF_TEXT_(x)

const char *lf_version(void) {
    return LF_TEXT(LF_VERSION_MAJOR) "." LF_TEXT(LF_VERSION_MINOR) "." LF_TEXT(LF_VERSION_PATCH);
}

int lf_version_number(void) { return LF_VERSION_MAJOR * 10000 + LF_VERSION_MINOR * 100 + LF_VERSION_PATCH; }

int lf_abi_version(void) { return LF_ABI_VERSION; }

const char *lf_last_error(void) { return error_message; }

const char *lf_status_name(int status) {
    switch (status) {
        case LF_OK: return "LF_OK";
        case LF_END: return "LF_END";
        case LF_TIMEOUT: return "LF_TIMEOUT";
        case LF_CANCELLED: return "LF_CANCELLED";
        case LF_ERR_ARGUMENT: return "LF_ERR_ARGUMENT";
        case LF_ERR_STATE: return "LF_ERR_STATE";
        case LF_ERR_CONFIG: return "LF_ERR_CONFIG";
        case LF_ERR_MEDIA: return "LF_ERR_MEDIA";
        case LF_ERR_PYTHON: return "LF_ERR_PYTHON";
        case LF_ERR_INTERNAL: return "LF_ERR_INTERNAL";
        case LF_ERR_MISUSE: return "LF_ERR_MISUSE";
        case LF_ERR_ABI: return "LF_ERR_ABI";
        default: return "LF_UNKNOWN_STATUS";
    }
}

#define LF_CONFIG_HEAD offsetof(lf_config, model) /* size and abi_version: what every ABI version has */

static int check_abi(size_t size, int abi_version, const char *api) {
    if (abi_version != LF_ABI_VERSION)
        return fail(LF_ERR_ABI, "%s: the caller was compiled against ABI %d, this library is ABI %d (%s): rebuild it "
                    "against this lipforcing.h", api, abi_version, LF_ABI_VERSION, lf_version());
    if (size < LF_CONFIG_HEAD)
        return fail(LF_ERR_ABI, "%s: lf_config.size is %zu: call lf_config_init on the config first", api, size);
    return LF_OK;
}

int lf_config_init_abi(lf_config *config, size_t size, int abi_version) {
    error_message[0] = 0;
    if (!config) return fail(LF_ERR_ARGUMENT, "lf_config_init: config is NULL");
    int status = check_abi(size, abi_version, "lf_config_init");
    if (status != LF_OK) return status;
    memset(config, 0, size < sizeof *config ? size : sizeof *config);
    config->size = size;
    config->abi_version = abi_version;
    return LF_OK;
}

/* Whether `text` is well-formed UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF). */
static int valid_utf8(const char *text) {
    const unsigned char *s = (const unsigned char *)text;
    while (*s) {
        unsigned c = *s;
        int extra = c < 0x80 ? 0 : (c & 0xe0) == 0xc0 ? 1 : (c & 0xf0) == 0xe0 ? 2 : (c & 0xf8) == 0xf0 ? 3 : -1;
        if (extra < 0 || (extra == 1 && c < 0xc2) || c > 0xf4) return 0;
        unsigned code = extra ? c & (0x3f >> extra) : c;
        for (int i = 1; i <= extra; i++) {
            if ((s[i] & 0xc0) != 0x80) return 0;
            code = code << 6 | (s[i] & 0x3f);
        }
        if ((extra == 2 && (code < 0x800 || (code >= 0xd800 && code <= 0xdfff))) ||
            (extra == 3 && (code < 0x10000 || code > 0x10ffff)))
            return 0;
        s += extra + 1;
    }
    return 1;
}

static int one_of(const char *value, const char *const *choices) {
    for (; *choices; choices++)
        if (!strcmp(value, *choices)) return 1;
    return 0;
}

static int valid_device(const char *device) {
    if (!strcmp(device, "cpu") || !strcmp(device, "cuda")) return 1;
    if (strncmp(device, "cuda:", 5) || !device[5]) return 0;
    for (const char *c = device + 5; *c; c++)
        if (*c < '0' || *c > '9') return 0;
    return strlen(device + 5) <= 4;
}

/* The caller's config, checked, into *out (its `size` bytes; later fields keep their defaults). */
static int check_config(const lf_config *config, lf_config *out, const char *api) {
    int status = check_abi(config->size, config->abi_version, api);
    if (status != LF_OK) return status;
    memset(out, 0, sizeof *out);
    memcpy(out, config, config->size < sizeof *out ? config->size : sizeof *out);
    for (size_t i = sizeof *out; i < config->size; i++)
        if (((const unsigned char *)config)[i])
            return fail(LF_ERR_ABI, "%s: the config sets fields this library (%s) does not have", api, lf_version());
    out->size = sizeof *out;

    static const char *const models[] = {"tiny", "1.3b", "14b", NULL}, *const dtypes[] = {"bf16", "fp16", "fp32", "fp8", NULL},
                             *const encoders[] = {"wan", "taehv", NULL}, *const decoders[] = {"taehv", "wan", NULL},
                             *const backends[] = {"triton", "sdpa", "reference", NULL};
    struct { const char *name, *value; const char *const *choices; } strings[] = {
        {"model", out->model, models},     {"ckpt", out->ckpt, NULL},          {"vae", out->vae, NULL},
        {"taehv", out->taehv, NULL},       {"wav2vec", out->wav2vec, NULL},    {"text_embeds", out->text_embeds, NULL},
        {"device", out->device, NULL},     {"dtype", out->dtype, dtypes},      {"encoder", out->encoder, encoders},
        {"decoder", out->decoder, decoders}, {"backend", out->backend, backends},
    };
    for (size_t i = 0; i < sizeof strings / sizeof *strings; i++) {
        const char *value = strings[i].value;
        if (!value || !*value) continue;
        if (!valid_utf8(value)) return fail(LF_ERR_ARGUMENT, "%s: config.%s is not valid UTF-8", api, strings[i].name);
        if (strings[i].choices && !one_of(value, strings[i].choices)) {
            char list[256] = "";
            for (const char *const *c = strings[i].choices; *c; c++)
                snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", c == strings[i].choices ? "" : ", ", *c);
            return fail(LF_ERR_CONFIG, "%s: unknown %s '%s'; choose one of %s", api, strings[i].name, value, list);
        }
    }
    if (out->device && *out->device && !valid_device(out->device))
        return fail(LF_ERR_CONFIG, "%s: unknown device '%s'; choose cpu, cuda or cuda:N", api, out->device);
    if (!isfinite(out->lookahead) || out->lookahead < 0)
        return fail(LF_ERR_ARGUMENT, "%s: lookahead must be a finite number of seconds >= 0, got %g", api,
                    out->lookahead);
    if (out->max_sessions < 0)
        return fail(LF_ERR_ARGUMENT, "%s: max_sessions must not be negative, got %d", api, out->max_sessions);
    return LF_OK;
}

/* ---- sessions ----------------------------------------------------------------------------------------- */

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

static PyObject *config_dict(const lf_config *c) {
    PyObject *dict = PyDict_New();
    if (dict && put_string(dict, "model", c->model) == 0 && put_string(dict, "ckpt", c->ckpt) == 0 &&
        put_string(dict, "vae", c->vae) == 0 && put_string(dict, "taehv", c->taehv) == 0 &&
        put_string(dict, "wav2vec", c->wav2vec) == 0 && put_string(dict, "text_embeds", c->text_embeds) == 0 &&
        put_string(dict, "device", c->device) == 0 && put_string(dict, "dtype", c->dtype) == 0 &&
        put_string(dict, "encoder", c->encoder) == 0 && put_string(dict, "decoder", c->decoder) == 0 &&
        put_string(dict, "backend", c->backend) == 0 &&
        put_number(dict, "live", PyLong_FromLong(c->live ? 1 : 0)) == 0 &&
        put_number(dict, "seed", PyLong_FromLong(c->seed)) == 0 &&
        put_number(dict, "max_sessions", PyLong_FromLong(c->max_sessions > 0 ? c->max_sessions : 1)) == 0 &&
        (c->lookahead <= 0 || put_number(dict, "lookahead", PyFloat_FromDouble(c->lookahead)) == 0))
        return dict;
    Py_XDECREF(dict);
    return NULL;
}

/* A session around the NativeSession `obj` (a new reference, or NULL with a Python error: the GIL is held). */
static int wrap_session(PyObject *obj, lf_session **out) {
    if (!obj) return python_failure();
    lf_session *session = (lf_session *)calloc(1, sizeof *session);
    if (!session || !live_add(session)) {
        free(session);
        Py_DECREF(obj);
        return fail(LF_ERR_INTERNAL, "out of memory for a session");
    }
    session->magic = LF_MAGIC;
    session->obj = obj;
    atomic_init(&session->cancel_pending, 0);
    *out = session;
    return LF_OK;
}

/* The start of lf_create and lf_engine_create: the arguments and the config checked (into `checked`), Python
   ready. */
static int begin_create(const lf_config *config, const void *out, lf_config *checked, const char *api) {
    error_message[0] = 0;
    if (!config || !out) return fail(LF_ERR_ARGUMENT, "%s: config and out must not be NULL", api);
    int status = check_config(config, checked, api);
    return status != LF_OK ? status : ready();
}

int lf_create(const lf_config *config, lf_session **out) {
    if (out) *out = NULL;
    lf_config checked;
    int status = begin_create(config, out, &checked, "lf_create");
    if (status != LF_OK) return status;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *dict = config_dict(&checked);
    status = wrap_session(dict ? PyObject_CallOneArg(session_class, dict) : NULL, out);
    Py_XDECREF(dict);
    PyGILState_Release(gil);
    return status;
}

int lf_engine_create(const lf_config *config, lf_engine **out) {
    if (out) *out = NULL;
    lf_config checked;
    int status = begin_create(config, out, &checked, "lf_engine_create");
    if (status != LF_OK) return status;
    lf_engine *engine = (lf_engine *)calloc(1, sizeof *engine);
    if (!engine) return fail(LF_ERR_INTERNAL, "lf_engine_create: out of memory");
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *dict = config_dict(&checked);
    PyObject *obj = dict ? PyObject_CallOneArg(engine_class, dict) : NULL;
    Py_XDECREF(dict);
    if (!obj) status = python_failure();
    else if (!live_add(engine)) {
        status = fail(LF_ERR_INTERNAL, "lf_engine_create: out of memory");
        Py_CLEAR(obj);
    }
    PyGILState_Release(gil);
    if (!obj) return free(engine), status;
    engine->magic = LF_ENGINE_MAGIC;
    engine->obj = obj;
    *out = engine;
    return LF_OK;
}

static int check_engine(const lf_engine *engine, const char *api) {
    if (!engine) return fail(LF_ERR_ARGUMENT, "%s: engine is NULL", api);
    if (!live_find(engine, LF_ENGINE_MAGIC, 0))
        return fail(LF_ERR_MISUSE, "%s: the engine is not live (destroyed already, or not made by lf_engine_create)",
                    api);
    return LF_OK;
}

int lf_engine_warm_up(lf_engine *engine, double *seconds) {
    error_message[0] = 0;
    int status = check_engine(engine, "lf_engine_warm_up");
    if (status != LF_OK) return status;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = PyObject_CallMethod(engine->obj, "warm_up", NULL);
    if (!result) status = python_failure();
    else if (seconds) *seconds = PyFloat_AsDouble(result);
    Py_XDECREF(result);
    PyGILState_Release(gil);
    return status;
}

int lf_session_create(lf_engine *engine, const lf_config *options, lf_session **out) {
    error_message[0] = 0;
    if (!out) return fail(LF_ERR_ARGUMENT, "lf_session_create: out is NULL");
    *out = NULL;
    int status = check_engine(engine, "lf_session_create");
    if (status != LF_OK) return status;
    lf_config checked;
    lf_config_init(&checked);
    if (options && (status = check_config(options, &checked, "lf_session_create")) != LF_OK) return status;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *dict = PyDict_New();
    PyObject *session = NULL;
    if (dict && put_number(dict, "live", PyLong_FromLong(checked.live ? 1 : 0)) == 0 &&
        (checked.lookahead <= 0 || put_number(dict, "lookahead", PyFloat_FromDouble(checked.lookahead)) == 0))
        session = PyObject_CallMethod(engine->obj, "session", "O", dict);
    status = wrap_session(session, out);
    Py_XDECREF(dict);
    PyGILState_Release(gil);
    return status;
}

void lf_engine_destroy(lf_engine *engine) {
    error_message[0] = 0;
    if (!engine) return;
    if (!live_find(engine, LF_ENGINE_MAGIC, 1)) {
        fail(LF_ERR_MISUSE, "lf_engine_destroy: the engine is not live (destroyed already, or not made by "
             "lf_engine_create)");
        return;
    }
    engine->magic = 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = PyObject_CallMethod(engine->obj, "destroy", NULL);
    if (!result) python_failure();
    Py_XDECREF(result);
    Py_DECREF(engine->obj);
    PyGILState_Release(gil);
    free(engine);
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
    int status = check_session(session, "lf_push_speech");
    if (status != LF_OK) return status;
    if (!samples) return fail(LF_ERR_ARGUMENT, "lf_push_speech: samples is NULL");
    if (sample_rate <= 0) return fail(LF_ERR_ARGUMENT, "lf_push_speech: sample rate must be positive, got %d",
                                      sample_rate);
    if (count > (size_t)PY_SSIZE_T_MAX / sizeof(float)) return fail(LF_ERR_ARGUMENT, "lf_push_speech: too many samples");
    for (size_t i = 0; i < count; i++)
        if (!isfinite(samples[i]))
            return fail(LF_ERR_ARGUMENT, "lf_push_speech: sample %zu is %s: speech must be finite", i,
                        isnan(samples[i]) ? "NaN" : "infinite");
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
    int status = check_session(session, api);
    if (status != LF_OK) return status;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = call(session, method, &status, "()");
    Py_XDECREF(result);
    PyGILState_Release(gil);
    return status;
}

int lf_end_speech(lf_session *session) { return call_plain(session, "lf_end_speech", "end_speech"); }

int lf_close(lf_session *session) { return call_plain(session, "lf_close", "close"); }

int lf_push_frame(lf_session *session, const uint8_t *rgb, int width, int height, size_t stride) {
    error_message[0] = 0;
    int status = check_session(session, "lf_push_frame");
    if (status != LF_OK) return status;
    if (!rgb) return fail(LF_ERR_ARGUMENT, "lf_push_frame: rgb is NULL");
    if (width <= 0 || height <= 0 || width > LF_MAX_FRAME_SIDE || height > LF_MAX_FRAME_SIDE)
        return fail(LF_ERR_ARGUMENT, "lf_push_frame: a frame of %dx%d (each side must be 1..%d)", width, height,
                    LF_MAX_FRAME_SIDE);
    if (stride < (size_t)width * 3)
        return fail(LF_ERR_ARGUMENT, "lf_push_frame: stride %zu is less than 3 x width (%d)", stride, width * 3);
    if (stride > (size_t)PY_SSIZE_T_MAX / (size_t)height)
        return fail(LF_ERR_ARGUMENT, "lf_push_frame: stride %zu is too large", stride);
    size_t size = stride * (size_t)(height - 1) + (size_t)width * 3;
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

/* One pop attempt of up to timeout_s. Into the caller's buffer when `buffer` is set, else a malloc'd copy. */
static int pop_once(lf_session *session, lf_frame *out, double timeout_s, uint8_t *buffer, size_t capacity,
                    size_t stride) {
    int status = LF_OK;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = NULL;
    if (buffer) {
        PyObject *view = PyMemoryView_FromMemory((char *)buffer, (Py_ssize_t)capacity, PyBUF_WRITE);
        if (view) {
            result = call(session, "pop_into", &status, "(Ond)", view, (Py_ssize_t)stride, timeout_s);
            Py_DECREF(view);
        } else {
            status = python_failure();
        }
    } else {
        result = call(session, "pop", &status, "(d)", timeout_s);
    }
    if (result) {
        long long index = 0;
        PyObject *array = NULL;
        Py_buffer view;
        Py_ssize_t size = 0;
        int width = 0, height = 0;
        if (result == Py_None) {
            status = LF_TIMEOUT;
        } else if (PyUnicode_Check(result)) {
            status = LF_END;
        } else if (buffer) {
            if (!PyArg_ParseTuple(result, "Lii", &index, &width, &height)) status = python_failure();
            else *out = (lf_frame){buffer, width, height, stride, index};
        } else if (!PyArg_ParseTuple(result, "LOii", &index, &array, &width, &height) ||
                   PyObject_GetBuffer(array, &view, PyBUF_C_CONTIGUOUS) < 0) {
            status = python_failure();
        } else { /* the frame's own memory, copied once into the caller's frame */
            size = view.len;
            if (size != (Py_ssize_t)width * height * 3) {
                status = fail(LF_ERR_INTERNAL, "lf_pop_frame: a frame of %zd bytes is not %dx%dx3", size, width, height);
            } else {
                uint8_t *data = (uint8_t *)malloc((size_t)size);
                if (!data) {
                    status = fail(LF_ERR_INTERNAL, "lf_pop_frame: out of memory for a %dx%d frame", width, height);
                } else {
                    memcpy(data, view.buf, (size_t)size);
                    *out = (lf_frame){data, width, height, (size_t)width * 3, index};
                }
            }
            PyBuffer_Release(&view);
        }
        Py_DECREF(result);
    }
    PyGILState_Release(gil);
    return status;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

/* Pop in slices of LF_POP_SLICE_S until a frame, the end, an error, the timeout or lf_cancel. */
static int pop(lf_session *session, lf_frame *out, int timeout_ms, uint8_t *buffer, size_t capacity, size_t stride) {
    double deadline = now_s() + timeout_ms / 1000.0;
    for (;;) {
        if (atomic_exchange(&session->cancel_pending, 0)) return LF_CANCELLED;
        double slice = LF_POP_SLICE_S;
        if (timeout_ms >= 0) {
            double left = deadline - now_s();
            slice = left < slice ? (left > 0 ? left : 0) : slice;
        }
        int status = pop_once(session, out, slice, buffer, capacity, stride);
        if (status != LF_TIMEOUT || (timeout_ms >= 0 && now_s() >= deadline)) return status;
    }
}

int lf_pop_frame(lf_session *session, lf_frame *out, int timeout_ms) {
    error_message[0] = 0;
    if (!out) return fail(LF_ERR_ARGUMENT, "lf_pop_frame: out is NULL");
    memset(out, 0, sizeof *out);
    int status = check_session(session, "lf_pop_frame");
    if (status != LF_OK) return status;
    return pop(session, out, timeout_ms, NULL, 0, 0);
}

int lf_pop_frame_into(lf_session *session, uint8_t *buffer, size_t capacity, size_t stride, lf_frame *out,
                      int timeout_ms) {
    error_message[0] = 0;
    if (!out) return fail(LF_ERR_ARGUMENT, "lf_pop_frame_into: out is NULL");
    memset(out, 0, sizeof *out);
    int status = check_session(session, "lf_pop_frame_into");
    if (status != LF_OK) return status;
    if (!buffer) return fail(LF_ERR_ARGUMENT, "lf_pop_frame_into: buffer is NULL");
    if (!stride || capacity > (size_t)PY_SSIZE_T_MAX || stride > (size_t)PY_SSIZE_T_MAX)
        return fail(LF_ERR_ARGUMENT, "lf_pop_frame_into: bad capacity %zu or stride %zu", capacity, stride);
    return pop(session, out, timeout_ms, buffer, capacity, stride);
}

void lf_frame_release(lf_frame *frame) {
    if (!frame) return;
    free(frame->data);
    memset(frame, 0, sizeof *frame);
}

int lf_cancel(lf_session *session) {
    error_message[0] = 0;
    int status = check_session(session, "lf_cancel");
    if (status != LF_OK) return status;
    atomic_store(&session->cancel_pending, 1);
    return LF_OK;
}

void lf_destroy(lf_session *session) {
    error_message[0] = 0;
    if (!session) return;
    if (!live_find(session, LF_MAGIC, 1)) {
        fail(LF_ERR_MISUSE, "lf_destroy: the session is not live (destroyed already, or not made by lf_create)");
        return;
    }
    session->magic = 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    int status = LF_OK;
    PyObject *result = call(session, "destroy", &status, "()");
    Py_XDECREF(result);
    Py_DECREF(session->obj);
    PyGILState_Release(gil);
    free(session);
}
