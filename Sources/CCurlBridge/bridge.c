#include "kmsfs_curl.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

/// libcurl's entry points, resolved once by `load`; `library` is set only when all of them were.
static struct {
    void *library;
    CURLcode (*global_init)(long);
    CURL *(*easy_init)(void);
    void (*easy_cleanup)(CURL *);
    void (*easy_reset)(CURL *);
    CURLcode (*easy_perform)(CURL *);
    const char *(*easy_strerror)(CURLcode);
    CURLcode (*easy_setopt)(CURL *, CURLoption, ...);
    CURLcode (*easy_getinfo)(CURL *, CURLINFO, ...);
    struct curl_slist *(*slist_append)(struct curl_slist *, const char *);
    void (*slist_free_all)(struct curl_slist *);
} api;
static char load_error[512];
static pthread_once_t loading = PTHREAD_ONCE_INIT;

static void load(void) {
    // The same libcurl ABI (soname 4) whichever TLS library it was built with.
    const char *names[] = {"libcurl.so.4", "libcurl-gnutls.so.4"};
    void *library = NULL;
    for (size_t i = 0; i < sizeof names / sizeof names[0] && library == NULL; i++) {
        library = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    }
    if (library == NULL) {
        const char *why = dlerror();
        snprintf(load_error, sizeof load_error, "cannot load libcurl (libcurl.so.4), which the AWS provider needs: %s",
                 why ? why : "not found");
        return;
    }
#define RESOLVE(field, symbol)                                                                                   \
    do {                                                                                                       \
        *(void **)(&api.field) = dlsym(library, symbol);                                                       \
        if (api.field == NULL) {                                                                               \
            snprintf(load_error, sizeof load_error, "the libcurl found has no %s (too old?)", symbol);         \
            dlclose(library);                                                                                  \
            return;                                                                                            \
        }                                                                                                      \
    } while (0)
    RESOLVE(global_init, "curl_global_init");
    RESOLVE(easy_init, "curl_easy_init");
    RESOLVE(easy_cleanup, "curl_easy_cleanup");
    RESOLVE(easy_reset, "curl_easy_reset");
    RESOLVE(easy_perform, "curl_easy_perform");
    RESOLVE(easy_strerror, "curl_easy_strerror");
    RESOLVE(easy_setopt, "curl_easy_setopt");
    RESOLVE(easy_getinfo, "curl_easy_getinfo");
    RESOLVE(slist_append, "curl_slist_append");
    RESOLVE(slist_free_all, "curl_slist_free_all");
#undef RESOLVE
    CURLcode code = api.global_init(CURL_GLOBAL_DEFAULT);
    if (code != CURLE_OK) {
        snprintf(load_error, sizeof load_error, "libcurl failed to initialize: %s", api.easy_strerror(code));
        return;
    }
    api.library = library;
}

int kmsfs_curl_load(char *error, size_t length) {
    pthread_once(&loading, load);
    if (api.library != NULL) return 0;
    if (length > 0) snprintf(error, length, "%s", load_error);
    return -1;
}

CURL *kmsfs_curl_easy_init(void) { return api.easy_init(); }
void kmsfs_curl_easy_cleanup(CURL *curl) { api.easy_cleanup(curl); }
void kmsfs_curl_easy_reset(CURL *curl) { api.easy_reset(curl); }
CURLcode kmsfs_curl_easy_perform(CURL *curl) { return api.easy_perform(curl); }
const char *kmsfs_curl_easy_strerror(CURLcode code) { return api.easy_strerror(code); }
struct curl_slist *kmsfs_curl_slist_append(struct curl_slist *list, const char *string) { return api.slist_append(list, string); }
void kmsfs_curl_slist_free_all(struct curl_slist *list) { api.slist_free_all(list); }

CURLcode kmsfs_curl_set_long(CURL *curl, CURLoption option, long value) { return api.easy_setopt(curl, option, value); }
CURLcode kmsfs_curl_set_pointer(CURL *curl, CURLoption option, const void *value) { return api.easy_setopt(curl, option, value); }
CURLcode kmsfs_curl_set_string(CURL *curl, CURLoption option, const char *value) { return api.easy_setopt(curl, option, value); }
CURLcode kmsfs_curl_set_offset(CURL *curl, CURLoption option, curl_off_t value) { return api.easy_setopt(curl, option, value); }
CURLcode kmsfs_curl_set_callback(CURL *curl, CURLoption option, kmsfs_curl_data_fn callback) { return api.easy_setopt(curl, option, callback); }
CURLcode kmsfs_curl_response_code(CURL *curl, long *code) { return api.easy_getinfo(curl, CURLINFO_RESPONSE_CODE, code); }
