/* A consumer written against ABI 0 (lipforcing 0.1): its lf_config had no size or ABI version, and
 * lf_config_init took the struct alone. Against ABI 1 it must be refused cleanly, never run with a struct the
 * library would overrun: it does not link (lf_config_init is no longer a symbol; lf_config_init_abi takes the
 * size), and a binary built earlier does not load (its liblipforcing.so.0 is not liblipforcing.so.1).
 * install_consume.cmake builds it and expects the link to fail. */
#include <stddef.h>
#include <stdio.h>

typedef struct lf_config_v0 {
    const char *model, *ckpt, *vae, *taehv, *wav2vec, *text_embeds, *device, *dtype, *encoder, *decoder, *backend;
    int live;
    double lookahead;
    int seed;
    int max_sessions;
} lf_config_v0;
typedef struct lf_session lf_session;
void lf_config_init(lf_config_v0 *config);
int lf_create(const lf_config_v0 *config, lf_session **out);

int main(void) {
    lf_config_v0 config;
    lf_config_init(&config);
    config.model = "tiny";
    lf_session *session = NULL;
    printf("old consumer: lf_create gave %d\n", lf_create(&config, &session));
    return 0;
}
