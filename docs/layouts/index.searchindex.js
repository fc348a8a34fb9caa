{{- $index := slice -}}
{{- range .Site.Pages -}}
{{- if and .Title (ne .Layout "search") -}}
{{- $index = $index | append (dict "title" .Title "url" .RelPermalink "section" (.CurrentSection.Title | default "") "text" (.Plain | htmlUnescape)) -}}
{{- end -}}
{{- end -}}
window.PERCH_INDEX = {{ $index | jsonify }};
