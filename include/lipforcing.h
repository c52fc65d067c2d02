/*
 * lipforcing.h: the C ABI of the lipforcing engine (C99 and C++; lipforcing.hpp wraps it in RAII classes).
 *
 * A session takes speech and talking-head frames and gives back lip-synced frames, as the Python session
 * (lipforcing.engine.app.session.LipSync) does: the library embeds CPython and calls that same session, so
 * the frames equal the Python API's for the same input.
 *
 *     lf_config cfg;
 *     lf_config_init(&cfg);                                 // sets cfg.size and cfg.abi_version: always call it
 *     cfg.model = "tiny";                                   // or "14b" with cfg.ckpt, cfg.vae, ...
 *     lf_session *s;
 *     if (lf_create(&cfg, &s) != LF_OK) { fprintf(stderr, "%s\n", lf_last_error()); return 1; }
 *     lf_push_speech(s, samples, n, 16000);                 // the whole clip ...
 *     lf_end_speech(s);                                     // ... then the frames
 *     for (each frame) {
 *         lf_push_frame(s, rgb, width, height, stride);
 *         lf_frame out;
 *         while (lf_pop_frame(s, &out, 0) == LF_OK) { use(out.data); lf_frame_release(&out); }
 *     }
 *     lf_close(s);                                          // flush
 *     lf_frame out;
 *     while (lf_pop_frame(s, &out, -1) == LF_OK) { use(out.data); lf_frame_release(&out); }  // until LF_END
 *     lf_destroy(s);
 *
 * Errors: every function returns an lf_status; on an error, lf_last_error() gives a message for the calling
 * thread (thread-local, valid until that thread's next call into the library). The configuration and the
 * arguments are checked in C before any Python runs; a user's mistake never comes back as LF_ERR_INTERNAL.
 *
 * ABI: LF_ABI_VERSION is the library's SONAME version (liblipforcing.so.LF_ABI_VERSION). lf_config_init
 * records the size of lf_config and the ABI version the caller was compiled with; lf_create refuses another
 * ABI version with LF_ERR_ABI and reads only the `size` bytes the caller has (later fields keep their
 * defaults), so fields appended in a later minor version do not break older callers. A handle used after
 * lf_destroy gives LF_ERR_MISUSE (the library keeps the set of live handles), never a use of freed memory.
 *
 * Threads: the library may be called from any thread. Calls on one session are serialized by the session
 * (a blocking lf_pop_frame holds it while it waits, so push and pop from one thread, or time-slice them);
 * lf_cancel may be called from any thread and wakes a waiting lf_pop_frame. Different sessions may be used
 * from different threads at once. The Python interpreter is started on the first lf_create (or the host's
 * interpreter is joined when the host is Python) and lives until the process exits; the library holds the
 * GIL only inside its calls.
 *
 * Python: the interpreter is the one the library was built against, started isolated (PYTHONHOME,
 * PYTHONPATH and every other PYTHON* variable are ignored, as is the user's site folder), with the Python
 * executable of the build (a virtual environment's) as its program, so that environment's packages are seen.
 * LIPFORCING_PYTHON (the path of another python executable of the same version) overrides it. Python's
 * sys.stdout is the process's stderr: nothing the engine prints can land in a host's output on stdout.
 * With lf_set_log_callback, Python's stdout and stderr go to the callback instead, line by line.
 */
#ifndef LIPFORCING_H
#define LIPFORCING_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LF_VERSION_MAJOR 0
#define LF_VERSION_MINOR 2
#define LF_VERSION_PATCH 0
/* The binary interface: changes when a struct's existing fields or a function's signature change. */
#define LF_ABI_VERSION 1
/* The largest frame side lf_push_frame accepts. */
#define LF_MAX_FRAME_SIDE 16384

#if defined(_WIN32)
#ifdef LF_BUILDING
#define LF_API __declspec(dllexport)
#else
#define LF_API __declspec(dllimport)
#endif
#elif defined(__GNUC__)
#define LF_API __attribute__((visibility("default")))
#else
#define LF_API
#endif

typedef enum lf_status {
    LF_OK = 0,
    LF_END = 1,              /* lf_pop_frame: the session is closed and every frame was popped */
    LF_TIMEOUT = 2,          /* lf_pop_frame: no frame within the timeout (not an error) */
    LF_CANCELLED = 3,        /* lf_pop_frame: woken by lf_cancel (not an error; the session goes on) */
    LF_ERR_ARGUMENT = -1,    /* a null pointer, a bad size or stride, a non-finite sample or number, bad UTF-8 */
    LF_ERR_STATE = -2,       /* a call out of order: a frame before the speech is complete, a push after close */
    LF_ERR_CONFIG = -3,      /* an unknown preset, dtype, device, encoder, decoder or backend; missing weight files */
    LF_ERR_MEDIA = -4,       /* the input cannot be used (no face where one is required, ...) */
    LF_ERR_PYTHON = -5,      /* the embedded interpreter or the lipforcing package could not be loaded */
    LF_ERR_INTERNAL = -6,    /* anything else (the message says what) */
    LF_ERR_MISUSE = -7,      /* a handle that is not live: destroyed already, or never made by the library */
    LF_ERR_ABI = -8          /* the caller was compiled against another LF_ABI_VERSION, or a struct is too small */
} lf_status;

/* What a session runs. Strings may be NULL (the default); they are copied by lf_create. New fields are only
 * ever appended. */
typedef struct lf_config {
    size_t size;              /* sizeof(lf_config) as the caller was compiled: set by lf_config_init */
    int abi_version;          /* LF_ABI_VERSION as the caller was compiled: set by lf_config_init */
    const char *model;        /* "tiny" (random weights, for tests), "1.3b" or "14b" (default "14b") */
    const char *ckpt;         /* student weights (.pth / .safetensors) */
    const char *vae;          /* Wan2.1_VAE.pth */
    const char *taehv;        /* taew2_1.pth */
    const char *wav2vec;      /* wav2vec2-base-960h directory */
    const char *text_embeds;  /* text_emb.pt */
    const char *device;       /* "cuda", "cuda:1", "cpu" (default: cuda when available) */
    const char *dtype;        /* "bf16", "fp16", "fp32", "fp8" (default bf16; the tiny model runs fp32) */
    const char *encoder;      /* "wan" or "taehv" */
    const char *decoder;      /* "taehv" or "wan" */
    const char *backend;      /* student kernels: "triton", "sdpa" or "reference" */
    int live;                 /* 0: the whole speech before the first frame; 1: speech streamed as it is spoken */
    double lookahead;         /* live: seconds of speech a chunk waits for beyond its frames (0: the default) */
    int seed;                 /* the sampler's noise */
    int max_sessions;         /* sessions at once on the shared engine of this configuration (0: 1). A live
                                 session takes its place at lf_create, a whole-speech one at its first frame;
                                 one more fails there with LF_ERR_CONFIG until a session is destroyed */
} lf_config;

/* A finished frame: RGB24, rows of `stride` bytes. Owned by the caller until lf_frame_release (frames filled
 * by lf_pop_frame_into point into the caller's buffer, and lf_frame_release only clears them). The library
 * writes this struct, so it is fixed for an ABI version: a new field means a new LF_ABI_VERSION (and SONAME). */
typedef struct lf_frame {
    uint8_t *data;
    int width;
    int height;
    size_t stride;
    int64_t index;            /* 0, 1, 2, ... in output order (25 fps) */
} lf_frame;

typedef struct lf_session lf_session;

LF_API const char *lf_version(void);                    /* "MAJOR.MINOR.PATCH" of the library */
LF_API int lf_version_number(void);                     /* major * 10000 + minor * 100 + patch */
LF_API int lf_abi_version(void);                        /* the library's LF_ABI_VERSION */
LF_API const char *lf_last_error(void);                 /* this thread's last error message ("" if none) */
LF_API const char *lf_status_name(int status);          /* "LF_OK", "LF_ERR_STATE", ... */

/* Every field to its default, with size and abi_version recorded (use the macro lf_config_init). */
LF_API int lf_config_init_abi(lf_config *config, size_t size, int abi_version);
#define lf_config_init(config) lf_config_init_abi((config), sizeof(lf_config), LF_ABI_VERSION)

LF_API int lf_create(const lf_config *config, lf_session **out);

/* Speech: float32 mono samples at `sample_rate` Hz (resampled to 16 kHz inside); every sample finite. Without
 * `live`, push the whole clip (in one or more calls) and call lf_end_speech before the first frame. */
LF_API int lf_push_speech(lf_session *session, const float *samples, size_t count, int sample_rate);
LF_API int lf_end_speech(lf_session *session);

/* A source frame: RGB24, width x height (1 .. LF_MAX_FRAME_SIDE), `stride` bytes per row (>= 3 * width). Any
 * size; the output frames have the same size. */
LF_API int lf_push_frame(lf_session *session, const uint8_t *rgb, int width, int height, size_t stride);

/* The next finished frame. timeout_ms 0: never waits; > 0: waits up to that long; < 0: waits until a frame
 * or the end. Returns LF_OK (a frame in *out), LF_TIMEOUT, LF_END, LF_CANCELLED or an error. */
LF_API int lf_pop_frame(lf_session *session, lf_frame *out, int timeout_ms);
/* The same, written straight into the caller's `buffer` (`capacity` bytes, rows of `stride` bytes); *out
 * describes it. A frame that does not fit gives LF_ERR_ARGUMENT and stays queued for the next pop. */
LF_API int lf_pop_frame_into(lf_session *session, uint8_t *buffer, size_t capacity, size_t stride, lf_frame *out,
                             int timeout_ms);
LF_API void lf_frame_release(lf_frame *frame);
/* Wake this session's waiting lf_pop_frame (or the next one) with LF_CANCELLED. Any thread. */
LF_API int lf_cancel(lf_session *session);

/* Flush: no more input; the remaining frames are finished and become poppable. */
LF_API int lf_close(lf_session *session);
/* Free the session (a running one is stopped). NULL is allowed; a handle that is not live is ignored (and
 * lf_last_error says so). */
LF_API void lf_destroy(lf_session *session);

/* An engine of the caller's own: the configuration's networks loaded once (lf_create shares one cached engine
 * per configuration for the life of the process instead), shared by the sessions made from it with
 * lf_session_create, up to config.max_sessions at once. lf_engine_destroy drops the handle; sessions made from it
 * keep the engine alive, and it is freed with the last of them. */
typedef struct lf_engine lf_engine;
LF_API int lf_engine_create(const lf_config *config, lf_engine **out);
/* Tune the kernels and capture the graphs of every window shape now rather than at the first chunk; *seconds
 * (may be NULL) gets the time spent (0 where there is nothing to prepare, as on a CPU). */
LF_API int lf_engine_warm_up(lf_engine *engine, double *seconds);
/* A session on `engine`; of `options` (NULL: the whole speech before the first frame) only live and lookahead
 * are read, the rest is the engine's. */
LF_API int lf_session_create(lf_engine *engine, const lf_config *options, lf_session **out);
LF_API void lf_engine_destroy(lf_engine *engine);

/* Where the engine's messages go: Python's stdout and stderr, one line per call (level 0: stdout's, 1:
 * stderr's). NULL: back to the process's stderr. (A host that is itself Python keeps its own streams.) Set it before the first lf_create to see start-up messages.
 * The callback may be called from any thread that calls into the library, with the GIL held: it must not
 * call back into the library. */
typedef void (*lf_log_callback)(int level, const char *line, void *user);
LF_API void lf_set_log_callback(lf_log_callback callback, void *user);

#ifdef __cplusplus
}
#endif

#endif /* LIPFORCING_H */
