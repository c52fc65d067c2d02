/*
 * lipforcing.h: the C ABI of the lipforcing engine (C99 and C++).
 *
 * A session takes speech and talking-head frames and gives back lip-synced frames, as the Python session
 * (lipforcing.engine.app.session.LipSync) does: the library embeds CPython and calls that same session, so
 * the frames equal the Python API's for the same input.
 *
 *     lf_config cfg;
 *     lf_config_init(&cfg);
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
 * thread (thread-local, valid until that thread's next call into the library).
 *
 * Threads: the library may be called from any thread. Calls on one session are serialized by the session
 * (a blocking lf_pop_frame holds it while it waits, so push and pop from one thread, or time-slice them);
 * different sessions may be used from different threads at once. The Python interpreter is started on the
 * first lf_create (or the host's interpreter is joined when the host is Python) and lives until the process
 * exits; the library holds the GIL only inside its calls.
 *
 * Python: the interpreter is the one the library was built against; LIPFORCING_PYTHON (the path of a
 * python executable, such as a virtual environment's) overrides where it finds the lipforcing package.
 */
#ifndef LIPFORCING_H
#define LIPFORCING_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LF_VERSION_MAJOR 0
#define LF_VERSION_MINOR 1
#define LF_VERSION_PATCH 0

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
    LF_ERR_ARGUMENT = -1,    /* a null pointer, a bad size or stride, an unknown option */
    LF_ERR_STATE = -2,       /* a call out of order: a frame before the speech is complete, a push after close */
    LF_ERR_CONFIG = -3,      /* an unknown preset, missing weight files, a bad device */
    LF_ERR_MEDIA = -4,       /* the input cannot be used (no face where one is required, ...) */
    LF_ERR_PYTHON = -5,      /* the embedded interpreter or the lipforcing package could not be loaded */
    LF_ERR_INTERNAL = -6     /* anything else (the message says what) */
} lf_status;

/* What a session runs. Strings may be NULL (the default); they are copied by lf_create. */
typedef struct lf_config {
    const char *model;        /* "tiny" (random weights, for tests), "1.3b" or "14b" (default "14b") */
    const char *ckpt;         /* student weights (.pth / .safetensors) */
    const char *vae;          /* Wan2.1_VAE.pth */
    const char *taehv;        /* taew2_1.pth */
    const char *wav2vec;      /* wav2vec2-base-960h directory */
    const char *text_embeds;  /* text_emb.pt */
    const char *device;       /* "cuda", "cuda:1", "cpu" (default: cuda when available) */
    const char *dtype;        /* "bf16", "fp16", "fp32" (default bf16; the tiny model runs fp32) */
    const char *encoder;      /* "wan" or "taehv" */
    const char *decoder;      /* "taehv" or "wan" */
    const char *backend;      /* student kernels: "triton" or "reference" */
    int live;                 /* 0: the whole speech before the first frame; 1: speech streamed as it is spoken */
    double lookahead;         /* live: seconds of speech a chunk waits for beyond its frames (0: the default) */
    int seed;                 /* the sampler's noise */
    int max_sessions;         /* sessions at once on the shared engine of this configuration (0: 1). A live
                                 session takes its place at lf_create, a whole-speech one at its first frame;
                                 one more fails there with LF_ERR_CONFIG until a session is destroyed */
} lf_config;

/* A finished frame: RGB24, rows of `stride` bytes. Owned by the caller until lf_frame_release. */
typedef struct lf_frame {
    uint8_t *data;
    int width;
    int height;
    size_t stride;
    int64_t index;            /* 0, 1, 2, ... in output order (25 fps) */
} lf_frame;

typedef struct lf_session lf_session;

LF_API const char *lf_version(void);                    /* "0.1.0" */
LF_API int lf_version_number(void);                     /* major * 10000 + minor * 100 + patch */
LF_API const char *lf_last_error(void);                 /* this thread's last error message ("" if none) */
LF_API const char *lf_status_name(int status);          /* "LF_OK", "LF_ERR_STATE", ... */

LF_API void lf_config_init(lf_config *config);           /* every field to its default */
LF_API int lf_create(const lf_config *config, lf_session **out);

/* Speech: float32 mono samples at `sample_rate` Hz (resampled to 16 kHz inside). Without `live`, push the
 * whole clip (in one or more calls) and call lf_end_speech before the first frame. */
LF_API int lf_push_speech(lf_session *session, const float *samples, size_t count, int sample_rate);
LF_API int lf_end_speech(lf_session *session);

/* A source frame: RGB24, width x height, `stride` bytes per row (>= 3 * width). Any size; the output frames
 * have the same size. */
LF_API int lf_push_frame(lf_session *session, const uint8_t *rgb, int width, int height, size_t stride);

/* The next finished frame. timeout_ms 0: never waits; > 0: waits up to that long; < 0: waits until a frame
 * or the end. Returns LF_OK (a frame in *out), LF_TIMEOUT, LF_END or an error. */
LF_API int lf_pop_frame(lf_session *session, lf_frame *out, int timeout_ms);
LF_API void lf_frame_release(lf_frame *frame);

/* Flush: no more input; the remaining frames are finished and become poppable. */
LF_API int lf_close(lf_session *session);
/* Free the session (a running one is stopped). NULL is allowed. */
LF_API void lf_destroy(lf_session *session);

#ifdef __cplusplus
}
#endif

#endif /* LIPFORCING_H */
