#include <stdio.h>

#include <lipforcing.h>

int main(void) {
    printf("found lipforcing %s\n", lf_version());
    return 0;
}
