/*
 * ctest cases of the C ABI:
 *   test_capi errors          bad input gets an error code and a message, never a crash
 *   test_capi session DIR     a tiny session on a shared clip's frames and speech (DIR from make_clip.py)
 *   test_capi cycles          50 create/destroy cycles do not grow resident memory
 *   test_capi threads         sessions created, fed and destroyed from four threads at once (the GIL)
 * Exit 0: pass, 1: fail, 77: skipped (no shared clip).
 */
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

static int errors(void) {
    lf_config config = tiny();
    lf_session *session = NULL;
    float speech[16000] = {0};
    uint8_t pixels[64 * 64 * 3] = {0};
    lf_frame frame;

    CHECK(lf_version_number() == 100 && !strcmp(lf_version(), "0.1.0"), "version");
    CHECK(lf_create(NULL, &session) == LF_ERR_ARGUMENT && strstr(lf_last_error(), "NULL"), "null config");
    CHECK(lf_create(&config, NULL) == LF_ERR_ARGUMENT, "null out");
    CHECK(lf_push_speech(NULL, speech, 10, 16000) == LF_ERR_ARGUMENT, "null session");
    CHECK(lf_push_frame(NULL, pixels, 64, 64, 192) == LF_ERR_ARGUMENT, "null session");
    CHECK(lf_pop_frame(NULL, &frame, 0) == LF_ERR_ARGUMENT, "null session");
    CHECK(lf_close(NULL) == LF_ERR_ARGUMENT, "null session");
    lf_destroy(NULL);

    lf_config unknown = tiny();
    unknown.model = "huge";
    int status = lf_create(&unknown, &session);
    CHECK(status == LF_ERR_CONFIG && session == NULL && strstr(lf_last_error(), "huge"), "unknown preset: %s",
          lf_status_name(status));

    CHECK(lf_create(&config, &session) == LF_OK && session, "create");
    if (!session) return 1;
    CHECK(lf_push_speech(session, NULL, 10, 16000) == LF_ERR_ARGUMENT, "null samples");
    CHECK(lf_push_speech(session, speech, 16000, 0) == LF_ERR_ARGUMENT, "zero rate");
    CHECK(lf_push_frame(session, pixels, 64, 64, 192) == LF_ERR_STATE && strstr(lf_last_error(), "speech"),
          "a frame before the speech");
    CHECK(lf_push_speech(session, speech, 16000, 16000) == LF_OK, "speech");
    CHECK(lf_end_speech(session) == LF_OK, "end speech");
    CHECK(lf_push_speech(session, speech, 10, 16000) == LF_ERR_STATE, "speech after end_speech");
    CHECK(lf_push_frame(session, NULL, 64, 64, 192) == LF_ERR_ARGUMENT, "null pixels");
    CHECK(lf_push_frame(session, pixels, 0, 64, 192) == LF_ERR_ARGUMENT, "zero width");
    CHECK(lf_push_frame(session, pixels, 64, -3, 192) == LF_ERR_ARGUMENT, "negative height");
    CHECK(lf_push_frame(session, pixels, 64, 64, 100) == LF_ERR_ARGUMENT && strstr(lf_last_error(), "stride"),
          "stride below 3 x width");
    CHECK(lf_push_frame(session, pixels, 100000, 1, 300000) == LF_ERR_ARGUMENT, "absurd width");
    CHECK(lf_pop_frame(session, NULL, 0) == LF_ERR_ARGUMENT, "null out frame");
    CHECK(lf_pop_frame(session, &frame, 0) == LF_TIMEOUT, "nothing to pop yet");
    CHECK(lf_close(session) == LF_OK, "close");
    CHECK(lf_push_frame(session, pixels, 64, 64, 192) == LF_ERR_STATE && strstr(lf_last_error(), "closed"),
          "push after close");
    CHECK(lf_pop_frame(session, &frame, 100) == LF_END, "end after close");
    lf_destroy(session);

    /* max_sessions (default 1): a second live session at once is refused until the first is destroyed */
    config.live = 1;
    lf_session *first = NULL, *second = NULL;
    CHECK(lf_create(&config, &first) == LF_OK, "first session");
    status = lf_create(&config, &second);
    CHECK(status == LF_ERR_CONFIG && !second && strstr(lf_last_error(), "already runs"), "second session: %s",
          lf_status_name(status));
    lf_destroy(first);
    CHECK(lf_create(&config, &second) == LF_OK, "a session after the first was destroyed");
    lf_destroy(second);
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
            lf_frame_release(&frame);
            popped++;
        }
    }
    CHECK(lf_close(session) == LF_OK, "close");
    int status;
    while ((status = lf_pop_frame(session, &frame, -1)) == LF_OK) {
        CHECK(frame.width == width && frame.height == height && frame.stride == (size_t)width * 3 &&
              frame.index == popped, "frame %d", popped);
        lf_frame_release(&frame);
        popped++;
    }
    CHECK(status == LF_END, "end: %s", lf_status_name(status));
    CHECK(popped == expected, "%d frames popped, %d expected", popped, expected);
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
