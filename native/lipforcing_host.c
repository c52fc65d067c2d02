/*
 * lipforcing_host: raw RGB24 frames in (stdin), lip-synced raw RGB24 frames out (stdout), the way hosts pipe
 * FFmpeg output:
 *
 *   ffmpeg -i talk.mp4 -f rawvideo -pix_fmt rgb24 -r 25 - \
 *     | lipforcing_host --model tiny --width 640 --height 360 --speech speech.f32 \
 *     | ffmpeg -f rawvideo -pix_fmt rgb24 -s 640x360 -r 25 -i - -i speech.wav out.mp4
 *
 * --speech is raw float32 mono at 16 kHz (ffmpeg -i speech.wav -f f32le -ac 1 -ar 16000 speech.f32).
 *
 * Exit status: 0 when every frame was written (then, and only then, stderr ends with "N frames in, M frames
 * out"); 1 when the output cannot be written (a closed pipe with SIGPIPE ignored, a full disk); 2 for bad
 * arguments, a bad speech file, truncated input, a failed allocation or an engine error. Only frames reach
 * stdout: the engine's own messages, Python's included, go to stderr.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lipforcing.h"

static FILE *output; /* the frames: the process's original stdout (fd 1 itself is pointed at stderr) */

static int usage(const char *why) {
    if (why) fprintf(stderr, "lipforcing_host: %s\n", why);
    fprintf(stderr,
            "usage: lipforcing_host --width W --height H --speech FILE.f32 [--model tiny|1.3b|14b] [--device D]\n"
            "                       [--ckpt F --vae F --taehv F --wav2vec DIR --text-embeds F] [--encoder E]\n");
    return 2;
}

static int failed(const char *what, int status) {
    fprintf(stderr, "lipforcing_host: %s: %s (%s)\n", what, lf_last_error(), lf_status_name(status));
    return 2;
}

static int write_failed(void) {
    fprintf(stderr, "lipforcing_host: cannot write the frames to stdout: %s\n", strerror(errno ? errno : EIO));
    return 1;
}

/* A whole number in [1, LF_MAX_FRAME_SIDE]. */
static int parse_side(const char *name, const char *text, int *out) {
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end || value < 1 || value > LF_MAX_FRAME_SIDE) {
        fprintf(stderr, "lipforcing_host: %s '%s': a whole number of pixels from 1 to %d\n", name, text,
                LF_MAX_FRAME_SIDE);
        return 0;
    }
    *out = (int)value;
    return 1;
}

/* The whole speech file as float32 samples; NULL (with a message) when it is not one. */
static float *read_speech(const char *path, size_t *samples) {
    FILE *file = fopen(path, "rb");
    struct stat info;
    if (!file || fstat(fileno(file), &info) != 0) {
        fprintf(stderr, "lipforcing_host: %s: %s\n", path, strerror(errno));
        if (file) fclose(file);
        return NULL;
    }
    float *speech = NULL;
    if (!S_ISREG(info.st_mode)) {
        fprintf(stderr, "lipforcing_host: %s: not a regular file (raw float32 samples expected)\n", path);
    } else if (info.st_size <= 0 || info.st_size % 4) {
        fprintf(stderr, "lipforcing_host: %s: not raw float32 samples (%lld bytes)\n", path, (long long)info.st_size);
    } else if (!(speech = (float *)malloc((size_t)info.st_size))) {
        fprintf(stderr, "lipforcing_host: %s: out of memory for %lld bytes of speech\n", path, (long long)info.st_size);
    } else if (fread(speech, 4, (size_t)info.st_size / 4, file) != (size_t)info.st_size / 4) {
        fprintf(stderr, "lipforcing_host: %s: cannot read it whole: %s\n", path, ferror(file) ? strerror(errno) :
                "it changed while being read");
        free(speech);
        speech = NULL;
    } else {
        *samples = (size_t)info.st_size / 4;
    }
    fclose(file);
    return speech;
}

/* Pop and write every frame ready (timeout_ms as lf_pop_frame). 0, or the exit status. */
static int drain(lf_session *session, int timeout_ms, long *written) {
    for (;;) {
        lf_frame frame;
        int status = lf_pop_frame(session, &frame, timeout_ms);
        if (status == LF_TIMEOUT || status == LF_END) return 0;
        if (status != LF_OK) return failed("pop", status);
        size_t row = (size_t)frame.width * 3;
        int ok = 1;
        for (int y = 0; ok && y < frame.height; y++)
            ok = fwrite(frame.data + (size_t)y * frame.stride, 1, row, output) == row;
        lf_frame_release(&frame);
        if (!ok) return write_failed();
        (*written)++;
    }
}

/* The frames of stdin through the session to the output. 0, or the exit status. */
static int run(lf_session *session, int width, int height, long *read, long *written) {
    size_t frame_bytes = (size_t)width * (size_t)height * 3;
    unsigned char *frame = (unsigned char *)malloc(frame_bytes);
    if (!frame) {
        fprintf(stderr, "lipforcing_host: out of memory for a %dx%d frame (%zu bytes)\n", width, height, frame_bytes);
        return 2;
    }
    int rc = 0;
    while (!rc) {
        size_t got = fread(frame, 1, frame_bytes, stdin);
        if (got != frame_bytes) {
            if (ferror(stdin)) {
                fprintf(stderr, "lipforcing_host: cannot read stdin: %s\n", strerror(errno));
                rc = 2;
            } else if (got) {
                fprintf(stderr, "lipforcing_host: truncated input: the last frame has %zu of %zu bytes (%dx%d RGB24)\n",
                        got, frame_bytes, width, height);
                rc = 2;
            }
            break;
        }
        (*read)++;
        int status = lf_push_frame(session, frame, width, height, (size_t)width * 3);
        rc = status != LF_OK ? failed("push", status) : drain(session, 0, written);
    }
    free(frame);
    if (rc) return rc;
    int status = lf_close(session);
    return status != LF_OK ? failed("close", status) : drain(session, -1, written);
}

int main(int argc, char **argv) {
    lf_config config;
    lf_config_init(&config);
    config.model = "14b";
    int width = 0, height = 0;
    const char *speech_path = NULL;
    for (int i = 1; i < argc; i += 2) {
        const char *key = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!value) return usage("an option without its value");
        if (!strcmp(key, "--width")) {
            if (!parse_side("--width", value, &width)) return 2;
        } else if (!strcmp(key, "--height")) {
            if (!parse_side("--height", value, &height)) return 2;
        } else if (!strcmp(key, "--speech")) speech_path = value;
        else if (!strcmp(key, "--model")) config.model = value;
        else if (!strcmp(key, "--device")) config.device = value;
        else if (!strcmp(key, "--ckpt")) config.ckpt = value;
        else if (!strcmp(key, "--vae")) config.vae = value;
        else if (!strcmp(key, "--taehv")) config.taehv = value;
        else if (!strcmp(key, "--wav2vec")) config.wav2vec = value;
        else if (!strcmp(key, "--text-embeds")) config.text_embeds = value;
        else if (!strcmp(key, "--encoder")) config.encoder = value;
        else return usage("unknown option");
    }
    if (!width || !height || !speech_path) return usage("--width, --height and --speech are required");

    /* stdout carries frames only: keep it for them, and send whatever else writes to fd 1 to stderr */
    int frames_fd = dup(STDOUT_FILENO);
    if (frames_fd < 0 || dup2(STDERR_FILENO, STDOUT_FILENO) < 0 || !(output = fdopen(frames_fd, "wb"))) {
        fprintf(stderr, "lipforcing_host: cannot set up stdout: %s\n", strerror(errno));
        return 2;
    }

    size_t samples = 0;
    float *speech = read_speech(speech_path, &samples);
    if (!speech) return 2;
    lf_session *session = NULL;
    int status = lf_create(&config, &session);
    if (status != LF_OK) return free(speech), failed("create", status);
    status = lf_push_speech(session, speech, samples, 16000);
    free(speech);
    if (status == LF_OK) status = lf_end_speech(session);
    if (status != LF_OK) return lf_destroy(session), failed("speech", status);

    long read = 0, written = 0;
    int rc = run(session, width, height, &read, &written);
    lf_destroy(session);
    errno = 0;
    if (fflush(output) != 0 || ferror(output)) return rc ? rc : write_failed();
    if (fclose(output) != 0 && !rc) return write_failed();
    if (!rc) fprintf(stderr, "lipforcing_host: %ld frames in, %ld frames out\n", read, written);
    return rc;
}
