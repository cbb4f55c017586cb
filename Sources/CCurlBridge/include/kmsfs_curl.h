// libcurl for the AWS KMS client, loaded with dlopen the first time it is needed: a mount whose key service
// makes no HTTP request (the local provider) never loads libcurl and the two dozen libraries it pulls in (TLS,
// Kerberos, LDAP, SSH, ...), about 4 MiB of the daemon's resident memory. curl_easy_setopt and
// curl_easy_getinfo are variadic, so Swift calls the typed wrappers below. The types and constants come from
// curl/curl.h; nothing here links against libcurl.
#ifndef KMSFS_CURL_H
#define KMSFS_CURL_H

#include <stddef.h>
#include <curl/curl.h>

typedef size_t (*kmsfs_curl_data_fn)(char *data, size_t size, size_t count, void *context);

/// Loads libcurl (libcurl.so.4, else libcurl-gnutls.so.4) and calls curl_global_init, once per process.
/// 0 when libcurl is ready; otherwise -1 with what failed written to `error` (NUL-terminated). Every other
/// function here may be called only after a 0.
int kmsfs_curl_load(char *error, size_t length);

CURL *kmsfs_curl_easy_init(void);
void kmsfs_curl_easy_cleanup(CURL *curl);
void kmsfs_curl_easy_reset(CURL *curl);
CURLcode kmsfs_curl_easy_perform(CURL *curl);
const char *kmsfs_curl_easy_strerror(CURLcode code);
struct curl_slist *kmsfs_curl_slist_append(struct curl_slist *list, const char *string);
void kmsfs_curl_slist_free_all(struct curl_slist *list);

CURLcode kmsfs_curl_set_long(CURL *curl, CURLoption option, long value);
CURLcode kmsfs_curl_set_pointer(CURL *curl, CURLoption option, const void *value);
CURLcode kmsfs_curl_set_string(CURL *curl, CURLoption option, const char *value);
CURLcode kmsfs_curl_set_offset(CURL *curl, CURLoption option, curl_off_t value);
CURLcode kmsfs_curl_set_callback(CURL *curl, CURLoption option, kmsfs_curl_data_fn callback);
CURLcode kmsfs_curl_response_code(CURL *curl, long *code);

#endif
