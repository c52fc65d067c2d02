/*
 * test_log: what the embedded interpreter prints never reaches the host's stdout. With a log callback, Python's
 * stdout and stderr come to it line by line (level 0 and 1); without one, both go to stderr. The test embeds
 * the same interpreter to print, as a host that also uses Python would. Exit 0: pass.
 */
#include <Python.h>

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "lipforcing.h"

static char seen[4096];

static void collect(int level, const char *line, void *user) {
    snprintf(seen + strlen(seen), sizeof seen - strlen(seen), "%d:%s|", level, line);
    ++*(int *)user;
}

static void python_prints(const char *code) {
    PyGILState_STATE gil = PyGILState_Ensure();
    PyRun_SimpleString(code);
    PyGILState_Release(gil);
}

int main(void) {
    char path[] = "/tmp/test_log_stdout_XXXXXX"; /* our stdout, to see that nothing lands there */
    int file = mkstemp(path);
    fflush(stdout);
    int saved = dup(1);
    if (file < 0 || saved < 0 || dup2(file, 1) < 0) return perror("stdout"), 1;
    int calls = 0;
    lf_set_log_callback(collect, &calls);
    lf_config config;
    lf_config_init(&config);
    config.model = "1.3b";
    config.ckpt = "/nonexistent/student.pth";
    lf_session *session = NULL;
    int status = lf_create(&config, &session); /* starts Python, then fails on the weights */
    python_prints("import sys\nprint('one')\nprint('two', end='')\nprint(' three')\nprint('err', file=sys.stderr)");
    lf_set_log_callback(NULL, NULL);
    python_prints("print('after, to stderr')");
    fflush(stdout);
    dup2(saved, 1);
    long landed = lseek(file, 0, SEEK_END);
    close(file);
    unlink(path);
    const char *want = "0:one|0:two three|1:err|";
    int ok = status == LF_ERR_CONFIG && !strcmp(seen, want) && calls == 3 && landed == 0;
    printf("callback saw '%s' (%d calls; expected '%s'); %ld bytes reached stdout: %s\n", seen, calls, want, landed,
           ok ? "ok" : "FAIL");
    return ok ? 0 : 1;
}
