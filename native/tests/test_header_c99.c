/* The header compiles as strict C99. */
#include "lipforcing.h"

int main(void) {
    lf_config config;
    lf_config_init(&config);
    return config.model == 0 && lf_status_name(LF_OK)[0] == 'L' ? 0 : 1;
}
