// Swagger UI for ollama-gw: the spec comes from this gateway; nothing is fetched from
// elsewhere (no validator badge, which would call validator.swagger.io).
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    validatorUrl: null,
    deepLinking: true,
    persistAuthorization: false,
  });
});
