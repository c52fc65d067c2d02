/* A program of one's own against the installed lipforcing (find_package(lipforcing)): a whole tiny session on
 * a clip written by make_clip.py, its frames decoded into this program's buffer and written to OUT.
 *
 *   consumer CLIP_DIR OUT.rgb        exit 0 when every frame came out */
#include <stdio.h>
#include <stdlib.h>

#include <lipforcing.h>

static void *slurp(const char *dir, const char *name, long *size) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *size = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *data = malloc(*size > 0 ? (size_t)*size : 1);
    if (data && fread(data, 1, (size_t)*size, f) != (size_t)*size) free(data), data = NULL;
    fclose(f);
    return data;
}

static int failed(const char *what, int status) {
    fprintf(stderr, "consumer: %s: %s (%s)\n", what, lf_last_error(), lf_status_name(status));
    return 1;
}

/* Every frame ready into `buffer`, appended to `out`. */
static int drain(lf_session *s, int timeout_ms, unsigned char *buffer, size_t size, int width, FILE *out, int *n) {
    lf_frame frame;
    int status;
    while ((status = lf_pop_frame_into(s, buffer, size, (size_t)width * 3, &frame, timeout_ms)) == LF_OK) {
        if (frame.data != buffer || fwrite(buffer, 1, size, out) != size) return failed("frame", LF_ERR_INTERNAL);
        (*n)++;
    }
    return status == LF_TIMEOUT || status == LF_END ? 0 : failed("pop", status);
}

int main(int argc, char **argv) {
    if (argc != 3) return fprintf(stderr, "usage: consumer CLIP_DIR OUT.rgb\n"), 2;
    long meta_size = 0, frames_size = 0, speech_size = 0;
    char *meta = (char *)slurp(argv[1], "meta.txt", &meta_size);
    unsigned char *frames = (unsigned char *)slurp(argv[1], "frames.rgb", &frames_size);
    float *speech = (float *)slurp(argv[1], "speech.f32", &speech_size);
    int width = 0, height = 0, count = 0, expected = 0;
    if (!meta || !frames || !speech || sscanf(meta, "%d %d %d %d", &width, &height, &count, &expected) != 4)
        return fprintf(stderr, "consumer: no clip in %s\n", argv[1]), 2;
    FILE *out = fopen(argv[2], "wb");
    if (!out) return perror(argv[2]), 2;

    lf_config config;
    lf_config_init(&config);
    config.model = "tiny";
    config.device = "cpu";
    config.encoder = "taehv";
    lf_session *s = NULL;
    int status = lf_create(&config, &s);
    if (status != LF_OK) return failed("create", status);
    if ((status = lf_push_speech(s, speech, (size_t)speech_size / 4, 16000)) != LF_OK) return failed("speech", status);
    if ((status = lf_end_speech(s)) != LF_OK) return failed("end_speech", status);
    size_t size = (size_t)width * height * 3;
    unsigned char *buffer = (unsigned char *)malloc(size);
    int n = 0, rc = 0;
    for (int i = 0; !rc && i < count; i++) {
        if ((status = lf_push_frame(s, frames + (size_t)i * size, width, height, (size_t)width * 3)) != LF_OK)
            return failed("push", status);
        rc = drain(s, 0, buffer, size, width, out, &n);
    }
    if (!rc && (status = lf_close(s)) != LF_OK) rc = failed("close", status);
    if (!rc) rc = drain(s, -1, buffer, size, width, out, &n);
    lf_destroy(s);
    if (fclose(out) != 0) rc = failed("write", LF_ERR_INTERNAL);
    printf("consumer: lipforcing %s, %d frames of %dx%d out, %d expected\n", lf_version(), n, width, height, expected);
    return rc || n != expected;
}
