/*
 * ctest cases of the C ABI:
 *   test_capi errors          the status table: every entry point x each bad input, the code and message
 *   test_capi session DIR     a tiny session on a shared clip's frames and speech (DIR from make_clip.py)
 *   test_capi cycles          50 create/destroy cycles do not grow resident memory
 *   test_capi threads         sessions created, fed and destroyed from four threads at once (the GIL)
 * Exit 0: pass, 1: fail, 77: skipped (no shared clip).
 */
#include <math.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lipforcing.h"

static int failures = 0;

#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                  \
            fprintf(stderr, " (last error: %s)\n", lf_last_error()); \
            failures++;                                    \
        }                                                  \
    } while (0)

static lf_config tiny(void) {
    lf_config config;
    lf_config_init(&config);
    config.model = "tiny";
    config.device = "cpu";
    config.encoder = "taehv";
    return config;
}

static void *cancel_later(void *session) {
    usleep(200 * 1000);
    lf_cancel((lf_session *)session);
    return NULL;
}

/* One row of the status table: what a call returned against what the header promises. */
static void expect(const char *what, int got, int want, const char *message) {
    CHECK(got == want, "%s: %s, expected %s", what, lf_status_name(got), lf_status_name(want));
    if (got == want && want < 0)
        CHECK(message && strstr(lf_last_error(), message), "%s: message '%s' lacks '%s'", what, lf_last_error(),
              message);
}

/* Every entry point x each bad input: the status code the header promises and the message, never a crash. */
static int errors(void) {
    lf_config config = tiny();
    lf_session *session = NULL;
    static float speech[16000];
    uint8_t pixels[64 * 64 * 3] = {0};
    lf_frame frame;

    CHECK(lf_version_number() == 200 && !strcmp(lf_version(), "0.2.0") && lf_abi_version() == LF_ABI_VERSION, "version");
    CHECK(!strcmp(lf_status_name(LF_ERR_MISUSE), "LF_ERR_MISUSE") && !strcmp(lf_status_name(99), "LF_UNKNOWN_STATUS"),
          "status names");

    /* lf_config_init: the ABI the caller was compiled with */
    lf_config old;
    expect("config_init NULL", lf_config_init_abi(NULL, sizeof old, LF_ABI_VERSION), LF_ERR_ARGUMENT, "NULL");
    expect("config_init ABI 0", lf_config_init_abi(&old, sizeof old, 0), LF_ERR_ABI, "ABI 0");
    expect("config_init size 4", lf_config_init_abi(&old, 4, LF_ABI_VERSION), LF_ERR_ABI, "lf_config_init");

    /* lf_create: each bad field, refused in C before Python starts */
    struct { const char *what; lf_config config; int want; const char *message; } creates[16];
    int n = 0;
#define BAD(field, value, status, text)                                                     \
    do {                                                                                     \
        creates[n].what = "create " #field "=" #value;                                       \
        creates[n].config = tiny();                                                          \
        creates[n].config.field = value;                                                     \
        creates[n].want = status;                                                            \
        creates[n].message = text;                                                           \
        n++;                                                                                 \
    } while (0)
    BAD(model, "nope", LF_ERR_CONFIG, "unknown model 'nope'; choose one of tiny, 1.3b, 14b");
    BAD(device, "gpu7", LF_ERR_CONFIG, "unknown device 'gpu7'");
    BAD(device, "cuda:x", LF_ERR_CONFIG, "unknown device");
    BAD(dtype, "int4", LF_ERR_CONFIG, "unknown dtype 'int4'");
    BAD(encoder, "vqgan", LF_ERR_CONFIG, "unknown encoder 'vqgan'");
    BAD(decoder, "vqgan", LF_ERR_CONFIG, "unknown decoder");
    BAD(backend, "cudnn", LF_ERR_CONFIG, "unknown backend");
    BAD(ckpt, "\xff\xfe.pth", LF_ERR_ARGUMENT, "config.ckpt is not valid UTF-8");
    BAD(model, "ti\xc0\xafny", LF_ERR_ARGUMENT, "config.model is not valid UTF-8"); /* an overlong '/' */
    BAD(lookahead, NAN, LF_ERR_ARGUMENT, "lookahead");
    BAD(lookahead, INFINITY, LF_ERR_ARGUMENT, "lookahead");
    BAD(lookahead, -0.5, LF_ERR_ARGUMENT, "lookahead");
    BAD(max_sessions, -1, LF_ERR_ARGUMENT, "max_sessions");
    BAD(abi_version, LF_ABI_VERSION + 1, LF_ERR_ABI, "rebuild it against this lipforcing.h");
    BAD(size, 0, LF_ERR_ABI, "call lf_config_init");
#undef BAD
    for (int i = 0; i < n; i++) {
        session = (lf_session *)&config; /* must be reset to NULL on failure */
        expect(creates[i].what, lf_create(&creates[i].config, &session), creates[i].want, creates[i].message);
        CHECK(session == NULL, "%s: out not cleared", creates[i].what);
    }
    expect("create NULL config", lf_create(NULL, &session), LF_ERR_ARGUMENT, "NULL");
    expect("create NULL out", lf_create(&config, NULL), LF_ERR_ARGUMENT, "NULL");
    /* a config from a newer minor version, with a field this library lacks set: refused, not ignored */
    struct { lf_config config; int extra; } newer;
    lf_config_init_abi(&newer.config, sizeof newer, LF_ABI_VERSION);
    newer.config.model = "tiny";
    newer.extra = 1;
    expect("create newer config", lf_create(&newer.config, &session), LF_ERR_ABI, "does not have");
    /* a caller compiled when lf_config ended before max_sessions (an older minor version): still works, the
     * missing field at its default */
    size_t older_size = offsetof(lf_config, max_sessions);
    lf_config *older = (lf_config *)malloc(older_size); /* exactly its size: AddressSanitizer sees any overrun */
    expect("config_init older", lf_config_init_abi(older, older_size, LF_ABI_VERSION), LF_OK, NULL);
    older->model = "tiny";
    older->device = "cpu";
    older->encoder = "taehv";
    expect("create older config", lf_create(older, &session), LF_OK, NULL);
    lf_destroy(session);
    free(older);
    lf_config unknown = tiny();
    unknown.model = "1.3b";
    unknown.ckpt = "/nonexistent/student.pth";
    expect("create missing weights", lf_create(&unknown, &session), LF_ERR_CONFIG, "student.pth");

    /* the entry points without a session */
    expect("push_speech NULL session", lf_push_speech(NULL, speech, 10, 16000), LF_ERR_ARGUMENT, "NULL");
    expect("end_speech NULL session", lf_end_speech(NULL), LF_ERR_ARGUMENT, "NULL");
    expect("push_frame NULL session", lf_push_frame(NULL, pixels, 64, 64, 192), LF_ERR_ARGUMENT, "NULL");
    expect("pop NULL session", lf_pop_frame(NULL, &frame, 0), LF_ERR_ARGUMENT, "NULL");
    expect("pop_into NULL session", lf_pop_frame_into(NULL, pixels, sizeof pixels, 192, &frame, 0), LF_ERR_ARGUMENT,
           "NULL");
    expect("cancel NULL session", lf_cancel(NULL), LF_ERR_ARGUMENT, "NULL");
    expect("close NULL session", lf_close(NULL), LF_ERR_ARGUMENT, "NULL");
    lf_destroy(NULL);
    lf_session *foreign = (lf_session *)pixels; /* never made by lf_create: refused before it is read */
    expect("push_speech foreign handle", lf_push_speech(foreign, speech, 10, 16000), LF_ERR_MISUSE, "not live");

    CHECK(lf_create(&config, &session) == LF_OK && session, "create");
    if (!session) return 1;
    expect("push_speech NULL samples", lf_push_speech(session, NULL, 10, 16000), LF_ERR_ARGUMENT, "samples is NULL");
    expect("push_speech NULL, 0", lf_push_speech(session, NULL, 0, 16000), LF_ERR_ARGUMENT, "samples is NULL");
    expect("push_speech rate 0", lf_push_speech(session, speech, 16000, 0), LF_ERR_ARGUMENT, "sample rate");
    speech[1234] = NAN;
    expect("push_speech NaN", lf_push_speech(session, speech, 16000, 16000), LF_ERR_ARGUMENT, "sample 1234 is NaN");
    speech[1234] = -INFINITY;
    expect("push_speech -inf", lf_push_speech(session, speech, 16000, 16000), LF_ERR_ARGUMENT, "infinite");
    speech[1234] = 0.25f;
    expect("push_frame before the speech", lf_push_frame(session, pixels, 64, 64, 192), LF_ERR_STATE, "speech");
    expect("push_speech", lf_push_speech(session, speech, 16000, 16000), LF_OK, NULL);
    expect("push_speech, 0 samples", lf_push_speech(session, speech, 0, 16000), LF_OK, NULL);
    expect("end_speech", lf_end_speech(session), LF_OK, NULL);
    expect("push_speech after end_speech", lf_push_speech(session, speech, 10, 16000), LF_ERR_STATE, "complete");
    expect("push_frame NULL pixels", lf_push_frame(session, NULL, 64, 64, 192), LF_ERR_ARGUMENT, "rgb is NULL");
    expect("push_frame zero width", lf_push_frame(session, pixels, 0, 64, 192), LF_ERR_ARGUMENT, "0x64");
    expect("push_frame negative height", lf_push_frame(session, pixels, 64, -3, 192), LF_ERR_ARGUMENT, "64x-3");
    expect("push_frame stride", lf_push_frame(session, pixels, 64, 64, 100), LF_ERR_ARGUMENT, "stride 100");
    expect("push_frame absurd width", lf_push_frame(session, pixels, 100000, 1, 300000), LF_ERR_ARGUMENT, "1..16384");
    expect("pop NULL out", lf_pop_frame(session, NULL, 0), LF_ERR_ARGUMENT, "out is NULL");
    expect("pop_into NULL buffer", lf_pop_frame_into(session, NULL, 10, 192, &frame, 0), LF_ERR_ARGUMENT,
           "buffer is NULL");
    expect("pop_into stride 0", lf_pop_frame_into(session, pixels, sizeof pixels, 0, &frame, 0), LF_ERR_ARGUMENT,
           "stride 0");
    expect("pop, nothing yet", lf_pop_frame(session, &frame, 0), LF_TIMEOUT, NULL);
    expect("cancel", lf_cancel(session), LF_OK, NULL);
    expect("pop after cancel", lf_pop_frame(session, &frame, -1), LF_CANCELLED, NULL);
    expect("pop, the cancel spent", lf_pop_frame(session, &frame, 0), LF_TIMEOUT, NULL);
    pthread_t canceller; /* a pop waiting for ever is woken by lf_cancel from another thread */
    pthread_create(&canceller, NULL, cancel_later, session);
    expect("pop woken by another thread's cancel", lf_pop_frame(session, &frame, -1), LF_CANCELLED, NULL);
    pthread_join(canceller, NULL);
    expect("close", lf_close(session), LF_OK, NULL);
    expect("close twice", lf_close(session), LF_OK, NULL);
    expect("push_frame after close", lf_push_frame(session, pixels, 64, 64, 192), LF_ERR_STATE, "closed");
    expect("end_speech after close", lf_end_speech(session), LF_ERR_STATE, "closed");
    expect("pop after close", lf_pop_frame(session, &frame, 100), LF_END, NULL);
    lf_destroy(session);

    /* a destroyed handle: LF_ERR_MISUSE from every entry point, and a second destroy is only reported */
    expect("push_speech destroyed", lf_push_speech(session, speech, 10, 16000), LF_ERR_MISUSE, "not live");
    expect("end_speech destroyed", lf_end_speech(session), LF_ERR_MISUSE, "lf_end_speech: the session is not live");
    expect("push_frame destroyed", lf_push_frame(session, pixels, 64, 64, 192), LF_ERR_MISUSE, "not live");
    expect("pop destroyed", lf_pop_frame(session, &frame, 0), LF_ERR_MISUSE, "not live");
    expect("pop_into destroyed", lf_pop_frame_into(session, pixels, sizeof pixels, 192, &frame, 0), LF_ERR_MISUSE,
           "not live");
    expect("cancel destroyed", lf_cancel(session), LF_ERR_MISUSE, "not live");
    expect("close destroyed", lf_close(session), LF_ERR_MISUSE, "not live");
    lf_destroy(session);
    CHECK(strstr(lf_last_error(), "lf_destroy: the session is not live"), "double destroy: '%s'", lf_last_error());

    /* an engine of the caller's own, shared by its sessions (max_sessions 2: a third live one is refused), which
     * outlive its handle; the handle after destroy, or a session's handle as an engine, is LF_ERR_MISUSE */
    lf_engine *engine = NULL;
    lf_config shared = tiny(), live = tiny(), bad = tiny();
    shared.max_sessions = 2;
    live.live = 1;
    bad.dtype = "int4";
    expect("engine_create NULL", lf_engine_create(NULL, &engine), LF_ERR_ARGUMENT, "NULL");
    expect("engine_create bad dtype", lf_engine_create(&bad, &engine), LF_ERR_CONFIG, "lf_engine_create: unknown dtype");
    expect("engine_warm_up NULL", lf_engine_warm_up(NULL, NULL), LF_ERR_ARGUMENT, "engine is NULL");
    expect("engine_create", lf_engine_create(&shared, &engine), LF_OK, NULL);
    double seconds = -1;
    expect("engine_warm_up", lf_engine_warm_up(engine, &seconds), LF_OK, NULL);
    CHECK(seconds == 0.0, "a CPU engine has nothing to warm up, got %g s", seconds);
    lf_session *a = NULL, *b = NULL, *c = NULL;
    expect("session_create live", lf_session_create(engine, &live, &a), LF_OK, NULL);
    expect("session_create second live", lf_session_create(engine, &live, &b), LF_OK, NULL);
    expect("session_create third live", lf_session_create(engine, &live, &c), LF_ERR_CONFIG, "already runs 2");
    bad = tiny();
    bad.lookahead = NAN;
    expect("session_create bad options", lf_session_create(engine, &bad, &c), LF_ERR_ARGUMENT,
           "lf_session_create: lookahead");
    expect("session_create NULL out", lf_session_create(engine, NULL, NULL), LF_ERR_ARGUMENT, "out is NULL");
    expect("engine handle as a session", lf_close((lf_session *)(void *)engine), LF_ERR_MISUSE, "session is not live");
    expect("session handle as an engine", lf_engine_warm_up((lf_engine *)(void *)a, NULL), LF_ERR_MISUSE,
           "engine is not live");
    lf_engine_destroy(engine);
    expect("push_speech, the engine's handle destroyed", lf_push_speech(a, speech, 16000, 16000), LF_OK, NULL);
    expect("session_create destroyed engine", lf_session_create(engine, NULL, &c), LF_ERR_MISUSE, "engine is not live");
    expect("engine_warm_up destroyed", lf_engine_warm_up(engine, NULL), LF_ERR_MISUSE, "engine is not live");
    lf_engine_destroy(engine);
    CHECK(strstr(lf_last_error(), "lf_engine_destroy: the engine is not live"), "engine destroyed twice: '%s'",
          lf_last_error());
    lf_destroy(a);
    lf_destroy(b);

    /* max_sessions (default 1): a second live session at once is refused until the first is destroyed */
    config.live = 1;
    lf_session *first = NULL, *second = NULL;
    CHECK(lf_create(&config, &first) == LF_OK, "first session");
    expect("second session", lf_create(&config, &second), LF_ERR_CONFIG, "already runs");
    lf_destroy(first);
    CHECK(lf_create(&config, &second) == LF_OK, "a session after the first was destroyed");
    lf_destroy(second);
    printf("status table: %d failures\n", failures);
    return failures ? 1 : 0;
}

static void *slurp(const char *dir, const char *name, size_t *size) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *size = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    void *data = malloc(*size ? *size : 1);
    if (data && fread(data, 1, *size, f) != *size) {
        free(data);
        data = NULL;
    }
    fclose(f);
    return data;
}

static int session_test(const char *dir) {
    size_t meta_size = 0, frames_size = 0, speech_size = 0;
    char *meta = (char *)slurp(dir, "meta.txt", &meta_size);
    if (!meta) {
        fprintf(stderr, "skip: no clip in %s (the shared clips are absent)\n", dir);
        return 77;
    }
    int width = 0, height = 0, count = 0, expected = 0;
    sscanf(meta, "%d %d %d %d", &width, &height, &count, &expected);
    free(meta);
    uint8_t *frames = (uint8_t *)slurp(dir, "frames.rgb", &frames_size);
    float *speech = (float *)slurp(dir, "speech.f32", &speech_size);
    CHECK(frames && speech && frames_size == (size_t)width * height * 3 * count, "clip files");
    if (!frames || !speech) return 1;

    char path[4096]; /* the frames out, for install_consume to compare with the installed library's */
    snprintf(path, sizeof path, "%s/capi_frames.rgb", dir);
    FILE *out = fopen(path, "wb");
    CHECK(out != NULL, "%s", path);
    if (!out) return 1;
    lf_config config = tiny();
    lf_session *session = NULL;
    CHECK(lf_create(&config, &session) == LF_OK, "create");
    CHECK(lf_push_speech(session, speech, speech_size / 4, 16000) == LF_OK, "speech");
    CHECK(lf_end_speech(session) == LF_OK, "end speech");
    int popped = 0;
    lf_frame frame;
    for (int i = 0; i < count; i++) {
        /* every other frame through a padded stride: the library must honour it */
        size_t row = (size_t)width * 3, stride = row + (i % 2 ? 64 : 0);
        uint8_t *source = frames + (size_t)i * row * height, *padded = NULL;
        if (stride != row) {
            padded = (uint8_t *)calloc((size_t)height, stride);
            for (int y = 0; y < height; y++) memcpy(padded + y * stride, source + y * row, row);
        }
        CHECK(lf_push_frame(session, padded ? padded : source, width, height, stride) == LF_OK, "push %d", i);
        free(padded);
        while (lf_pop_frame(session, &frame, 0) == LF_OK) {
            CHECK(frame.width == width && frame.height == height && frame.index == popped, "frame %d", popped);
            CHECK(fwrite(frame.data, 1, frame.stride * height, out) == frame.stride * height, "write %d", popped);
            lf_frame_release(&frame);
            popped++;
        }
    }
    CHECK(lf_close(session) == LF_OK, "close");
    int status;
    while ((status = lf_pop_frame(session, &frame, -1)) == LF_OK) {
        CHECK(frame.width == width && frame.height == height && frame.stride == (size_t)width * 3 &&
              frame.index == popped, "frame %d", popped);
        CHECK(fwrite(frame.data, 1, frame.stride * height, out) == frame.stride * height, "write %d", popped);
        lf_frame_release(&frame);
        popped++;
    }
    CHECK(status == LF_END, "end: %s", lf_status_name(status));
    CHECK(popped == expected, "%d frames popped, %d expected", popped, expected);
    CHECK(fclose(out) == 0, "%s", path);
    lf_destroy(session);
    free(frames);
    free(speech);
    printf("session: %d frames of %dx%d in, %d out\n", count, width, height, popped);
    return failures ? 1 : 0;
}

static long resident_kb(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
    fclose(f);
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static int cycles(void) {
    /* live sessions: each cycle makes a whole engine session (its speech buffer, feature window, workers) and
     * feeds it speech and frames short of a chunk, then destroys it */
    lf_config config = tiny();
    config.live = 1;
    static float speech[16000];
    static uint8_t pixels[96 * 96 * 3];
    long after_warm = 0;
    for (int i = 0; i < 50; i++) {
        lf_session *session = NULL;
        CHECK(lf_create(&config, &session) == LF_OK, "create %d", i);
        if (!session) return 1;
        CHECK(lf_push_speech(session, speech, 16000, 16000) == LF_OK, "speech %d", i);
        for (int f = 0; f < 3; f++) CHECK(lf_push_frame(session, pixels, 96, 96, 96 * 3) == LF_OK, "frame %d", i);
        lf_destroy(session);
        if (i == 4) after_warm = resident_kb();
    }
    long end = resident_kb();
    printf("resident memory after 5 cycles %ld kB, after 50 %ld kB\n", after_warm, end);
#ifdef __SANITIZE_ADDRESS__
    printf("AddressSanitizer holds freed memory in its quarantine: growth not checked\n");
#else
    CHECK(end - after_warm < 20 * 1024, "resident memory grew by %ld kB over 45 cycles", end - after_warm);
#endif
    return failures ? 1 : 0;
}

static void *thread_work(void *arg) {
    /* every thread: its own live sessions, speech and frames short of a chunk, an error case, destroy */
    long *failed = (long *)arg;
    lf_config config = tiny();
    config.live = 1;
    config.max_sessions = 4; /* one engine, four sessions at once */
    static float speech[8000];
    static uint8_t pixels[64 * 64 * 3];
    for (int i = 0; i < 5; i++) {
        lf_session *session = NULL;
        if (lf_create(&config, &session) != LF_OK) {
            fprintf(stderr, "create: %s\n", lf_last_error());
            (*failed)++;
            continue;
        }
        if (lf_push_speech(session, speech, 8000, 16000) != LF_OK) (*failed)++;
        if (lf_push_frame(session, pixels, 64, 64, 64 * 3) != LF_OK) (*failed)++;
        if (lf_push_frame(session, pixels, 64, 64, 10) != LF_ERR_ARGUMENT || !strstr(lf_last_error(), "stride"))
            (*failed)++; /* the message is this thread's */
        lf_frame frame;
        if (lf_pop_frame(session, &frame, 10) != LF_TIMEOUT) (*failed)++;
        lf_destroy(session);
    }
    return NULL;
}

static int threads(void) {
    pthread_t ids[4];
    long failed[4] = {0, 0, 0, 0};
    for (int i = 0; i < 4; i++) pthread_create(&ids[i], NULL, thread_work, &failed[i]);
    for (int i = 0; i < 4; i++) pthread_join(ids[i], NULL);
    for (int i = 0; i < 4; i++) CHECK(failed[i] == 0, "thread %d: %ld failed calls", i, failed[i]);
    printf("4 threads x 5 sessions: %s\n", failures ? "failures" : "ok");
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "errors")) return errors();
    if (argc >= 3 && !strcmp(argv[1], "session")) return session_test(argv[2]);
    if (argc >= 2 && !strcmp(argv[1], "cycles")) return cycles();
    if (argc >= 2 && !strcmp(argv[1], "threads")) return threads();
    fprintf(stderr, "usage: test_capi errors | session DIR | cycles | threads\n");
    return 2;
}
