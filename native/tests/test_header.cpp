// The header compiles as C++ (and test_header_c99.c as strict C99); the ABI's constants and types are usable.
#include "lipforcing.h"

#include <cstdio>

int main() {
    lf_config config;
    lf_config_init(&config);
    lf_frame frame = {};
    lf_frame_release(&frame);
    std::printf("lipforcing %s (%d), %s\n", lf_version(), lf_version_number(), lf_status_name(LF_ERR_STATE));
    return lf_version_number() == LF_VERSION_MAJOR * 10000 + LF_VERSION_MINOR * 100 + LF_VERSION_PATCH ? 0 : 1;
}
