// Records script errors into a hidden element, so a headless browser's DOM dump shows them.
(function(){
  var box = document.getElementById('js-errors');
  function record(msg){ box.textContent += msg + '\n'; box.setAttribute('data-count', (+box.getAttribute('data-count') || 0) + 1); }
  window.addEventListener('error', function(e){ record('error: ' + e.message + ' at ' + (e.filename || '') + ':' + (e.lineno || '')); });
  window.addEventListener('unhandledrejection', function(e){ record('unhandled rejection: ' + (e.reason && (e.reason.stack || e.reason))); });
  var original = console.error;
  console.error = function(){ record('console.error: ' + Array.prototype.join.call(arguments, ' ')); original.apply(console, arguments); };
})();
