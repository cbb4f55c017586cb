#include "kmsfs_curl.h"

CURLcode kmsfs_curl_set_long(CURL *curl, CURLoption option, long value) { return curl_easy_setopt(curl, option, value); }
CURLcode kmsfs_curl_set_pointer(CURL *curl, CURLoption option, const void *value) { return curl_easy_setopt(curl, option, value); }
CURLcode kmsfs_curl_set_string(CURL *curl, CURLoption option, const char *value) { return curl_easy_setopt(curl, option, value); }
CURLcode kmsfs_curl_set_offset(CURL *curl, CURLoption option, curl_off_t value) { return curl_easy_setopt(curl, option, value); }
CURLcode kmsfs_curl_set_callback(CURL *curl, CURLoption option, kmsfs_curl_data_fn callback) { return curl_easy_setopt(curl, option, callback); }
CURLcode kmsfs_curl_response_code(CURL *curl, long *code) { return curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, code); }
