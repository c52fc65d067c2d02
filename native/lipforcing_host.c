/*
 * lipforcing_host: raw RGB24 frames in (stdin), lip-synced raw RGB24 frames out (stdout), the way hosts pipe
 * FFmpeg output:
 *
 *   ffmpeg -i talk.mp4 -f rawvideo -pix_fmt rgb24 -r 25 - \
 *     | lipforcing_host --model tiny --width 640 --height 360 --speech speech.f32 \
 *     | ffmpeg -f rawvideo -pix_fmt rgb24 -s 640x360 -r 25 -i - -i speech.wav out.mp4
 *
 * --speech is raw float32 mono at 16 kHz (ffmpeg -i speech.wav -f f32le -ac 1 -ar 16000 speech.f32). Errors go
 * to stderr with exit status 2; the frames already written stay valid.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lipforcing.h"

static int usage(void) {
    fprintf(stderr,
            "usage: lipforcing_host --width W --height H --speech FILE.f32 [--model tiny|1.3b|14b] [--device D]\n"
            "                       [--ckpt F --vae F --taehv F --wav2vec DIR --text-embeds F]\n");
    return 2;
}

static int failed(const char *what, int status) {
    fprintf(stderr, "lipforcing_host: %s: %s (%s)\n", what, lf_last_error(), lf_status_name(status));
    return 2;
}

static int drain(lf_session *session, int timeout_ms, long *written) {
    for (;;) {
        lf_frame frame;
        int status = lf_pop_frame(session, &frame, timeout_ms);
        if (status == LF_TIMEOUT || status == LF_END) return 0;
        if (status != LF_OK) return failed("pop", status);
        size_t row = (size_t)frame.width * 3;
        for (int y = 0; y < frame.height; y++) fwrite(frame.data + (size_t)y * frame.stride, 1, row, stdout);
        lf_frame_release(&frame);
        (*written)++;
    }
}

int main(int argc, char **argv) {
    lf_config config;
    lf_config_init(&config);
    config.model = "14b";
    int width = 0, height = 0;
    const char *speech_path = NULL;
    for (int i = 1; i < argc; i++) {
        const char *key = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!value) return usage();
        if (!strcmp(key, "--width")) width = atoi(value);
        else if (!strcmp(key, "--height")) height = atoi(value);
        else if (!strcmp(key, "--speech")) speech_path = value;
        else if (!strcmp(key, "--model")) config.model = value;
        else if (!strcmp(key, "--device")) config.device = value;
        else if (!strcmp(key, "--ckpt")) config.ckpt = value;
        else if (!strcmp(key, "--vae")) config.vae = value;
        else if (!strcmp(key, "--taehv")) config.taehv = value;
        else if (!strcmp(key, "--wav2vec")) config.wav2vec = value;
        else if (!strcmp(key, "--text-embeds")) config.text_embeds = value;
        else if (!strcmp(key, "--encoder")) config.encoder = value;
        else return usage();
        i++;
    }
    if (width <= 0 || height <= 0 || !speech_path) return usage();

    FILE *file = fopen(speech_path, "rb");
    if (!file) {
        perror(speech_path);
        return 2;
    }
    fseek(file, 0, SEEK_END);
    long bytes = ftell(file);
    fseek(file, 0, SEEK_SET);
    if (bytes <= 0 || bytes % 4) {
        fprintf(stderr, "lipforcing_host: %s: not raw float32 samples (%ld bytes)\n", speech_path, bytes);
        fclose(file);
        return 2;
    }
    float *speech = (float *)malloc((size_t)bytes);
    size_t samples = speech ? fread(speech, 4, (size_t)bytes / 4, file) : 0;
    fclose(file);

    lf_session *session = NULL;
    int status = lf_create(&config, &session);
    if (status != LF_OK) return free(speech), failed("create", status);
    status = lf_push_speech(session, speech, samples, 16000);
    free(speech);
    if (status == LF_OK) status = lf_end_speech(session);
    if (status != LF_OK) return lf_destroy(session), failed("speech", status);

    size_t frame_bytes = (size_t)width * height * 3;
    unsigned char *frame = (unsigned char *)malloc(frame_bytes);
    long read = 0, written = 0;
    int rc = 0;
    while (!rc && fread(frame, 1, frame_bytes, stdin) == frame_bytes) {
        status = lf_push_frame(session, frame, width, height, (size_t)width * 3);
        if (status != LF_OK) rc = failed("push", status);
        else rc = drain(session, 0, &written);
        read++;
    }
    free(frame);
    if (!rc) {
        status = lf_close(session);
        rc = status != LF_OK ? failed("close", status) : drain(session, -1, &written);
    }
    fflush(stdout);
    lf_destroy(session);
    fprintf(stderr, "lipforcing_host: %ld frames in, %ld frames out\n", read, written);
    return rc;
}
