// The headers compile as C++ (and test_header_c99.c as strict C99); the ABI's constants and types are usable, and
// lipforcing.hpp turns a refused configuration into an Error with the status (checked in C: no Python starts).
#include "lipforcing.hpp"

#include <cstdio>
#include <cstring>

int main() {
    lipforcing::Config config;
    lf_frame frame = {};
    lf_frame_release(&frame);
    std::printf("lipforcing %s (%d, ABI %d), %s\n", lf_version(), lf_version_number(), lf_abi_version(),
                lf_status_name(LF_ERR_STATE));
    if (config.size != sizeof(lf_config) || config.abi_version != LF_ABI_VERSION) return 1;
    if (lf_version_number() != LF_VERSION_MAJOR * 10000 + LF_VERSION_MINOR * 100 + LF_VERSION_PATCH) return 1;
    config.model = "nope";
    try {
        lipforcing::Session session(config);
        return 1;
    } catch (const lipforcing::Error &e) {
        std::printf("%s\n", e.what());
        if (e.status() != LF_ERR_CONFIG || !std::strstr(e.what(), "unknown model 'nope'")) return 1;
    }
    try {
        lipforcing::Engine engine(config);
        return 1;
    } catch (const lipforcing::Error &e) {
        if (e.status() != LF_ERR_CONFIG || !std::strstr(e.what(), "lf_engine_create: unknown model")) return 1;
    }
    lipforcing::Frame empty;
    return empty.data() == nullptr ? 0 : 1;
}
