// ReDoc for ollama-gw: the spec comes from this gateway, fonts are the browser's own.
window.addEventListener("load", function () {
  Redoc.init("openapi.json", {hideDownloadButton: false, disableSearch: false},
             document.getElementById("redoc"));
});
